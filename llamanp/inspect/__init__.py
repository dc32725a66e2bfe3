"""Looking inside: named hooks on every activation of the forward pass.

    logits, acts = model.run_with_cache(ids, names=None | [names] | predicate)
    logits = model.run_with_hooks(ids, hooks=[(name or predicate, fn)])
    llamanp.generate(model, ids, n, hooks=[...])     # every step, any KV cache

fn(value, name) sees the array at a hook point and may return a replacement
(ablation, patching, steering). The points, their shapes and worked examples
on SmolLM2 are in docs/inspect.md. Also here: the logit lens (lens.py), the
pictures (draw.py, needs matplotlib) and llama-np.py's flags for both (cli.py).
"""

from .hooks import (
    ATTENTION_POINTS,
    BLOCK_POINTS,
    Activations,
    HookError,
    HookSet,
    Recorder,
    hook_names,
    read_cache,
    reference_attention,
    run_with_cache,
    run_with_hooks,
)
from .lens import Lens, lens_text, logit_lens

__all__ = ["ATTENTION_POINTS", "BLOCK_POINTS", "Activations", "HookError", "HookSet", "Lens",
           "Recorder", "hook_names", "lens_text", "logit_lens", "read_cache",
           "reference_attention", "run_with_cache", "run_with_hooks"]
