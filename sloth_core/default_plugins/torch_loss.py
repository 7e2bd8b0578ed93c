"""The core's causal-LM loss: chunked through the op registry, never the full logits."""

from __future__ import annotations

from sloth_core import hookimpl
from sloth_core.patches.lm_head import counted_labels, plain_weight, shift_labels


@hookimpl(trylast=True)
def compute_loss(model, hidden_states, labels, ops, num_items_in_batch, ignore_index):
    """Shifted causal-LM cross entropy over the lm_head, with final-logit softcapping."""
    head = model.get_output_embeddings()
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    targets = shift_labels(labels, ignore_index).reshape(-1).to(hidden_states.device)
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    options = dict(
        ignore_index=ignore_index, softcap=softcap, num_items_in_batch=num_items_in_batch
    )
    weight = plain_weight(head)
    if weight is not None:
        # The count the forward started on entry: the kernels cut the rows to the counted
        # ones without a host sync.
        counted = counted_labels(labels, ignore_index).value()
        return ops.fused_linear_cross_entropy(
            hidden, weight, targets, bias=head.bias, counted=counted, **options
        )
    return ops.cross_entropy(head(hidden), targets, **options)
