"""``lens-rome edit``: rewrite one fact and show the model before and after.

::

    lens-rome edit --prompt "{} is located in the city of" \\
        --subject "The Eiffel Tower" --target " Rome" --generate

prints the next-token probabilities (the top tokens, and the target's first
token) before and after the edit, and with ``--generate`` greedy continuations
of the prompt and of ``"{subject} is"``; ``--save FILE`` writes the edit
(reload it with ``lens_rome.editing.rome.Edit.load``).  :func:`add_edit_parser` and
:func:`run_edit` are wired into ``lens_rome.cli``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lens_rome.cli import arguments
from lens_rome.cli.arguments import add_model_option, command, count, positive_int
from lens_rome.data.requests import EditRequest, fill


def add_edit_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``edit`` command to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "edit", help="rewrite one fact with ROME and show the model before and after",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--prompt", required=True,
                        help="the relation, with {} where the subject goes")
    parser.add_argument("--subject", required=True)
    parser.add_argument("--target", required=True,
                        help="the new object, usually with a leading space: ' Rome'")
    add_model_option(parser)
    parser.add_argument("--layer", type=int, default=None,
                        help="the MLP layer to edit (default: the model's own)")
    parser.add_argument("--lookup", default=None,
                        help="subject_last (default), subject_first, last, or a token index")
    parser.add_argument("--generate", action="store_true",
                        help="also print greedy continuations before and after")
    parser.add_argument("--tokens", type=count, default=20, help="tokens to generate")
    parser.add_argument("--top", type=positive_int, default=5, help="next tokens to list")
    parser.add_argument("--save", metavar="FILE", help="write the edit here (safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="let --save replace a file")
    parser.set_defaults(run=run_edit)
    return parser


@command
def run_edit(args: argparse.Namespace) -> int:
    """Run ``lens-rome edit``; returns the exit status (2 for bad input)."""
    from lens_rome.editing import rome  # noqa: PLC0415 (heavy import after parsing)
    from lens_rome.editing.hparams import check_lookup  # noqa: PLC0415 (heavy import after parsing)
    from lens_rome.evaluation import measures  # noqa: PLC0415 (heavy import after parsing)

    request = EditRequest.parse(
        {"prompt": args.prompt, "subject": args.subject, "target_new": args.target})
    lookup = args.lookup
    if isinstance(lookup, str) and lookup.lstrip("-").isdigit():
        lookup = int(lookup)
    if lookup is not None:
        check_lookup(lookup)
    if args.save and Path(args.save).exists() and not args.overwrite:
        raise FileExistsError(f"{args.save} already exists; pass --overwrite to replace it")
    model = arguments.load(args.model, args.backend)
    prompts = [request.text]
    if args.generate:
        prompts.append(fill("{} is", request.subject))

    def show(label):
        print(f"{label}: {request.text!r}")
        for token, prob in measures.next_token_probs(model, request.text, args.top,
                                                     targets=[request.target_new]):
            print(f"  {token!r:>16} {prob:.4f}")
        if args.generate:
            for prompt in prompts:
                continuation = measures.greedy_continuation(model, prompt, args.tokens)
                print(f"  {prompt!r} -> {continuation!r}")

    show("before")
    change = rome.edit(model, request, layer=args.layer, lookup=lookup, progress=True)
    print(f"\nedited layer {change.layer} at token {change.info['lookup_token']!r} "
          f"in {change.info['seconds']:.1f} s\n")
    show("after")
    if args.save:
        path = change.save(args.save, overwrite=args.overwrite)
        print(f"\nwrote {path}")
    return 0
