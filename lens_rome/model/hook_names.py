"""Hook point names per backend, as data: the one table that knows them.

Kinds a trace restores: ``"hidden"`` (residual stream after a block),
``"mlp"`` (MLP output), ``"attn"`` (attention output), ``"head"`` (each head's
output before ``W_O``, ``[batch, pos, head, d_head]``); ``"key"`` is the MLP
hidden activation, the input of ``W_out``.  The rest are the inner points
attribution's QK fix reads.  A ``TransformerBridge`` has the
``HookedTransformer`` names as aliases, but its hooks see their canonical
names, so its column names those.
"""

from __future__ import annotations

HOOKED = "HookedTransformer"
BRIDGE = "TransformerBridge"

HOOK_NAMES: dict[str, dict[str, str]] = {
    HOOKED: {
        "embed": "hook_embed",
        "resid_pre": "blocks.{layer}.hook_resid_pre",
        "resid_mid": "blocks.{layer}.hook_resid_mid",
        "hidden": "blocks.{layer}.hook_resid_post",
        "mlp": "blocks.{layer}.hook_mlp_out",
        "attn": "blocks.{layer}.hook_attn_out",
        "key": "blocks.{layer}.mlp.hook_post",
        "head": "blocks.{layer}.attn.hook_z",
        "q": "blocks.{layer}.attn.hook_q",
        "k": "blocks.{layer}.attn.hook_k",
        "rot_q": "blocks.{layer}.attn.hook_rot_q",
        "rot_k": "blocks.{layer}.attn.hook_rot_k",
        "v": "blocks.{layer}.attn.hook_v",
        "attn_scores": "blocks.{layer}.attn.hook_attn_scores",
        "pattern": "blocks.{layer}.attn.hook_pattern",
    },
    BRIDGE: {
        "embed": "embed.hook_out",
        "resid_pre": "blocks.{layer}.hook_in",
        "resid_mid": "blocks.{layer}.ln2.hook_in",
        "hidden": "blocks.{layer}.hook_out",
        "mlp": "blocks.{layer}.mlp.hook_out",
        "attn": "blocks.{layer}.attn.hook_out",
        "key": "blocks.{layer}.mlp.out.hook_in",
        "head": "blocks.{layer}.attn.o.hook_in",
        "q": "blocks.{layer}.attn.q.hook_out",
        "k": "blocks.{layer}.attn.k.hook_out",
        "rot_q": "blocks.{layer}.attn.hook_rot_q",
        "rot_k": "blocks.{layer}.attn.hook_rot_k",
        "v": "blocks.{layer}.attn.v.hook_out",
        "attn_scores": "blocks.{layer}.attn.hook_attn_scores",
        "pattern": "blocks.{layer}.attn.hook_pattern",
    },
}
