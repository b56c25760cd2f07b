"""Online and iterative DPO: generate from the policy, score with a reward source, pair, train."""
