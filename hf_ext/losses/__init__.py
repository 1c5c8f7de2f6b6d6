"""Reference math of the policy losses hf_ext adds to GRPO. Pure torch: no TRL or Transformers import."""

from .ba import ba_aggregate, ba_group_metrics, ba_row_weights, balanced_aggregation


__all__ = ["ba_aggregate", "ba_group_metrics", "ba_row_weights", "balanced_aggregation"]
