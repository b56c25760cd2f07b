"""Labels for preference pairs, from people and from machines.

page.py     `preftune label`: a local page where people say which response is better (append-only
            judgments, calibration pairs, position bias cancelled across annotators).
agree.py    `preftune data agree|build`: inter-annotator agreement (Cohen's/Fleiss' kappa,
            calibration accuracy, position bias), a judge's agreement with people, and
            majority-vote pairs from judgments.
machine.py  `preftune score` and `preftune data sft-pairs`: labels from a reward source, and pairs
            from SFT data (the human response chosen, a policy sample rejected).
"""

from .agree import agreement_report, build_from_judgments, human_labels, judge_agreement
from .machine import judge_labels, run_score, run_sft_pairs
from .page import LabelItem, LabelStore, load_items, make_label_server, read_judgments

__all__ = ["LabelItem", "LabelStore", "load_items", "read_judgments", "make_label_server", "agreement_report",
           "build_from_judgments", "run_score", "run_sft_pairs", "human_labels", "judge_agreement", "judge_labels"]
