"""preftune vs TRL on identical work (`python -m benchmarks.speed_vs_trl`) and the bf16 check (bf16_check)."""
