"""The paper's ROME, transcribed from Meng et al.'s code onto TransformerLens hooks.

A line-by-line transcription of ``rome/compute_u.py``, ``rome/compute_v.py``,
``rome/repr_tools.py`` (the lookup index) and ``rome/rome_main.py`` (the
update) of the paper's repository, with ``nethook`` replaced by hook functions
on ``blocks.{l}.hook_post`` (the input of ``W_out``) and
``blocks.{l}.hook_mlp_out`` (its output, where no norm follows the MLP: GPT-2- and
Llama-style models; on Gemma that hook is after the post-MLP norm, while the paper's
code writes ``v*`` at the down projection's output).  It is the yardstick for
``lens_rome``'s ROME and imports nothing of lens_rome's editing code.  Slow on
purpose: every step runs the whole model on every prompt.

Two liberties, both numerical: ``C^-1`` is taken in float64 (the paper inverts in
float32), and prompts are right-padded with token 0 (attention is causal, so the
padding never reaches a real position, as the paper's attention mask ensures).
The tokenizer must add no BOS (GPT-2's, SmolLM2's and the tiny test models' don't).
"""

from __future__ import annotations

import torch

# rome/hparams/ROME/gpt2-xl.json
PAPER_HPARAMS = {"v_num_grad_steps": 20, "v_lr": 5e-1, "v_weight_decay": 0.5,
                 "clamp_norm_factor": 4, "kl_factor": 0.0625}


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows])


def words_idxs_in_templates(tokenizer, context_templates, words, subtoken="last"):
    """``repr_tools.get_words_idxs_in_templates``: the index of the word's last token."""
    fill_idxs = [tmp.index("{}") for tmp in context_templates]
    prefixes = [tmp[: fill_idxs[i]] for i, tmp in enumerate(context_templates)]
    suffixes = [tmp[fill_idxs[i] + 2:] for i, tmp in enumerate(context_templates)]
    words = list(words)
    for i, prefix in enumerate(prefixes):
        if len(prefix) > 0:
            assert prefix[-1] == " "
            prefixes[i] = prefix[:-1]
            words[i] = f" {words[i].strip()}"
    prefixes_len = [len(_ids(tokenizer, p)) for p in prefixes]
    words_len = [len(_ids(tokenizer, w)) for w in words]
    suffixes_len = [len(_ids(tokenizer, s)) for s in suffixes]
    assert subtoken == "last"
    del suffixes_len  # used by the "first_after_last" strategy only
    return [prefixes_len[i] + words_len[i] - 1 for i in range(len(context_templates))]


def reprs_at_word_tokens(model, tokenizer, context_templates, words, layer, hook):
    """``repr_tools.get_reprs_at_word_tokens``: ``hook``'s activation at each word's last
    token, one row per template ``[n, d]``."""
    idxs = words_idxs_in_templates(tokenizer, context_templates, words)
    texts = [t.format(w) for t, w in zip(context_templates, words)]
    seen = {}

    def keep(activation, hook):
        seen["a"] = activation.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(_padded([_ids(tokenizer, t) for t in texts]),
                             fwd_hooks=[(f"blocks.{layer}.{hook}", keep)])
    return seen["a"][torch.arange(len(texts)), torch.tensor(idxs)]


def compute_u(model, tokenizer, request, layer, context_templates, second_moment):
    """``compute_u``: ``C^-1 k*`` (``k*``: the key averaged over the contexts), unit norm."""
    word = request["subject"]
    cur_repr = reprs_at_word_tokens(
        model, tokenizer, [templ.format(request["prompt"]) for templ in context_templates],
        [word for _ in range(len(context_templates))], layer, "mlp.hook_post").mean(0)
    u = torch.inverse(second_moment.double()) @ cur_repr.double().unsqueeze(1)
    u = u.squeeze().float()
    return u / u.norm()


def compute_v(model, tokenizer, request, layer, left_vector, context_templates,
              hparams=PAPER_HPARAMS, history=None):
    """``compute_v``: the right vector ``(v* - W k0) / (k0 . u)`` of the rank-one update."""
    target_ids = _ids(tokenizer, request["target_new"])
    rewriting_prompts, kl_prompts = [
        context.format(request["prompt"]) + tokenizer.decode(target_ids[:-1])
        for context in context_templates
    ], ["{} is a"]
    all_prompts = rewriting_prompts + kl_prompts
    rows = [_ids(tokenizer, prompt.format(request["subject"])) for prompt in all_prompts]
    input_tok = _padded(rows)

    rewriting_targets = torch.tensor(-100).repeat(len(rewriting_prompts), input_tok.shape[1])
    for i in range(len(rewriting_prompts)):
        ex_len = len(rows[i])
        rewriting_targets[i, ex_len - len(target_ids): ex_len] = torch.tensor(target_ids)

    lookup_idxs = [words_idxs_in_templates(tokenizer, [prompt], [request["subject"]])[0]
                   for prompt in all_prompts]

    delta = torch.zeros(model.cfg.d_model, requires_grad=True)
    target_init, kl_distr_init = None, None

    def edit_output_fn(cur_out, hook):
        nonlocal target_init
        if target_init is None:
            target_init = cur_out[0, lookup_idxs[0]].detach().clone()
        cur_out = cur_out.clone()
        for i, idx in enumerate(lookup_idxs):
            cur_out[i, idx, :] += delta
        return cur_out

    opt = torch.optim.Adam([delta], lr=hparams["v_lr"])
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        for it in range(hparams["v_num_grad_steps"]):
            opt.zero_grad()
            logits = model.run_with_hooks(
                input_tok, fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", edit_output_fn)])
            kl_logits = torch.stack([logits[i - len(kl_prompts), idx, :]
                                     for i, idx in enumerate(lookup_idxs[-len(kl_prompts):])])
            kl_log_probs = torch.nn.functional.log_softmax(kl_logits, dim=1)
            if kl_distr_init is None:
                kl_distr_init = kl_log_probs.detach().clone()

            log_probs = torch.log_softmax(logits[: len(rewriting_prompts)], dim=2)
            loss = torch.gather(
                log_probs, 2,
                torch.where(rewriting_targets != -100, rewriting_targets, 0).unsqueeze(2),
            ).squeeze(2)
            mask = (rewriting_targets != -100).float()
            nll_loss_each = -(loss * mask).sum(1) / len(target_ids)
            nll_loss = nll_loss_each.mean()
            kl_loss = hparams["kl_factor"] * torch.nn.functional.kl_div(
                kl_distr_init, kl_log_probs, log_target=True, reduction="batchmean")
            weight_decay = hparams["v_weight_decay"] * (
                torch.norm(delta) / torch.norm(target_init) ** 2)
            loss = nll_loss + kl_loss + weight_decay
            if history is not None:
                history.append(float(loss.detach()))
            if loss < 5e-2:
                break
            if it == hparams["v_num_grad_steps"] - 1:
                break
            loss.backward()
            opt.step()
            max_norm = hparams["clamp_norm_factor"] * target_init.norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)

    target = target_init + delta.detach()
    cur_input = reprs_at_word_tokens(model, tokenizer, [request["prompt"]],
                                     [request["subject"]], layer, "mlp.hook_post")[0]
    cur_output = reprs_at_word_tokens(model, tokenizer, [request["prompt"]],
                                      [request["subject"]], layer, "hook_mlp_out")[0]
    return (target - cur_output) / torch.dot(cur_input, left_vector)


def rome_weight_change(model, tokenizer, request, layer, prefixes, second_moment,
                       hparams=PAPER_HPARAMS, history=None):
    """``execute_rome``: the change ``[d_mlp, d_model]`` to ``blocks[layer].mlp.W_out``.

    ``prefixes``: the context texts; the templates are ``["{}"] + [p + ". {}"]``
    as ``rome_main.get_context_templates`` makes them.
    """
    context_templates = ["{}"] + [p.replace("{", "").replace("}", "") + ". {}" for p in prefixes]
    left_vector = compute_u(model, tokenizer, request, layer, context_templates, second_moment)
    right_vector = compute_v(model, tokenizer, request, layer, left_vector, context_templates,
                             hparams, history)
    return left_vector.unsqueeze(1) @ right_vector.unsqueeze(0)
