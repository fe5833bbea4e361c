"""Names shared by the tensor stages and the cube, with no dependencies (neither torch nor xarray).

The response types label the cube's ``response`` dimension; probes.py validates against them and the report
groups and colours them in this order.
"""

#: Response types of the LLM paper, in the order reports group and colour them (DESIGN §3).
RESPONSE_TYPES = ("chosen", "rejected", "rephrase_chosen", "rephrase_rejected", "format_chosen", "format_rejected",
                  "other_trained", "other_untrained", "irrelevant", "shuffled", "random")  # fmt: skip
#: Computed along ``chosen`` (the per-position teacher-forced argmax), never given in a file.
ARGMAX = "argmax"

#: Remainder ratio ‖Δ_obs − Δ_lin‖ / ‖Δ_obs‖ above which an interval's first-order account is flagged as poor
#: (the pipeline's warning and the report's verdict use the same line).
POOR_LINEARISATION = 0.5

#: The responses of a preference pair, in the order its training rows hold them: the cube's ``own_response`` labels.
OWN_RESPONSES = ("chosen", "rejected")
#: k of the likelihood-displacement top-k overlap when no pair displaces its chosen answer (else k = how many do).
DISPLACE_TOPK = 5
#: k of the NTHR top-k overlap: the negative-response tokens that drag a GRPO group's correct completions most.
NTHR_TOPK = 10
#: A GRPO group's correct completions are *lazy* when its negative part cancels more than this share of the pull
#: its positive part gives them (−lld_neg / lld_pos); they are *displaced* when the group's own update lowers them.
LAZY_SHARE = 0.5
