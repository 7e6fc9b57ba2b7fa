"""Copy the main-branch weights of a dual checkpoint into the deploy graph, with an exact account.

Every deploy ``state_dict`` key is filled from exactly one dual key (:meth:`DeployPlan.map_key`), tensors are
taken as saved (fp16 stays fp16), and the account proves that every main-branch tensor was used exactly once and
that no auxiliary tensor leaked in.

One normalisation: negative zeros become ``+0.0``. The official notebook copies weights as ``w -= w; w += v``,
which turns every ``-0.0`` into ``+0.0``; doing the same (numerically a no-op, ``-0.0 == 0.0``) makes our deploy
state_dict equal the official conversion byte for byte. It is done in place on the checkpoint's tensors
(:func:`canonical_zeros`), so the deploy state_dict holds those very tensors: no copy.
"""

from __future__ import annotations

import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import torch

from ..errors import InvalidInputError
from .pruning import DeployPlan, main_branch


@dataclass
class TransferAccount:
    """What :func:`transfer_weights` did.

    Attributes:
        used: number of dual tensors copied; ``dropped``: number of dual tensors left out (auxiliary branch).
        main_keys: number of dual tensors that belong to the main branch.
        dropped_bytes: bytes of the auxiliary tensors left out.
        problems: violations found (empty when the transfer is exact).
    """

    used: int
    dropped: int
    main_keys: int
    dropped_bytes: int
    problems: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        """True when every main tensor was used exactly once and nothing else was."""
        return not self.problems


def _layer(key: str) -> tuple[int, str]:
    m = re.match(r"^model\.(\d+)\.(.*)$", key)
    if not m:
        raise InvalidInputError(f"weight '{key}' is not under model.<layer>.; the checkpoint is not a YOLOv9 model")
    return int(m.group(1)), m.group(2)


def main_branch_keys(dual_sd: "OrderedDict[str, torch.Tensor]", dual_cfg: dict,
                     branch: str | None = None) -> set[str]:
    """Dual keys of the main branch, read from the dual graph itself (:func:`.pruning.main_branch`), not from a
    deploy plan: the layers the head's main inputs depend on, and the main half of the head (``branch``: the head
    branch kept where there are several, e.g. TripleDDetect's ``"coarse"``; None: the head's default)."""
    layers, head, main_subs = main_branch(dual_cfg, branch)
    out = set()
    for k in dual_sd:
        i, rest = _layer(k)
        if i == head:
            if main_subs is None or rest.split(".", 1)[0] in main_subs:
                out.add(k)
        elif i in layers:
            out.add(k)
    return out


#: float dtype -> (integer dtype of the same width, the bit pattern of -0.0 read as that integer)
_NEGATIVE_ZERO = {torch.float16: (torch.int16, -2**15), torch.bfloat16: (torch.int16, -2**15),
                  torch.float32: (torch.int32, -2**31), torch.float64: (torch.int64, -2**63)}


def canonical_zeros(t: torch.Tensor) -> torch.Tensor:
    """Turn every ``-0.0`` of ``t`` into ``+0.0`` in place and return ``t`` (no copy; non-float tensors unchanged).

    Its values do not change (``-0.0 == 0.0``), so a model holding ``t`` computes the same values after: the deploy
    model keeps sharing the checkpoint's own tensors (the dual model's too) instead of holding copies. ``-0.0`` is
    the sign bit alone, which read as a signed integer of the same width is that integer type's minimum: so one
    ``min`` over the bits (no boolean copy) tells whether there is any, and only then are they replaced.
    """
    if t.dtype not in _NEGATIVE_ZERO or t.numel() == 0:
        return t
    as_int, pattern = _NEGATIVE_ZERO[t.dtype]
    bits = t.detach().view(as_int)
    if int(bits.min()) == pattern:
        bits.masked_fill_(bits == pattern, 0)
    return t


def transfer_weights(
    dual_sd: "OrderedDict[str, torch.Tensor]", deploy_keys: list[str], plan: DeployPlan, dual_cfg: dict,
    branch: str | None = None,
) -> tuple["OrderedDict[str, torch.Tensor]", TransferAccount]:
    """Build the deploy state_dict for ``deploy_keys`` (the deploy model's own ``state_dict()`` keys, in order).

    The account compares the tensors used with the main branch of ``dual_cfg`` (the checkpoint's own graph, see
    :func:`main_branch_keys`; ``branch``: the head branch the user chose, see :func:`.pruning.main_branch`), so a
    plan that maps a deploy layer to the wrong dual layer, reads the auxiliary half of the head or leaves a block
    out is not exact.

    Raises InvalidInputError when a deploy key has no source tensor or shapes differ — the checkpoint's weights
    do not fit its own config.
    """
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    uses: Counter[str] = Counter()
    for k in deploy_keys:
        src = plan.map_key(k)
        if src not in dual_sd:
            raise InvalidInputError(
                f"deploy weight '{k}' should come from '{src}', which the checkpoint lacks; its weights do not match "
                "its model config"
            )
        out[k] = canonical_zeros(dual_sd[src])
        uses[src] += 1
    main = main_branch_keys(dual_sd, dual_cfg, branch)
    problems = []
    twice = sorted(k for k, n in uses.items() if n > 1)
    if twice:
        problems.append(f"{len(twice)} main tensor(s) used more than once, e.g. {twice[0]}")
    unused = sorted(main - set(uses))
    if unused:
        problems.append(f"{len(unused)} main-branch tensor(s) not used, e.g. {unused[0]}")
    leaked = sorted(set(uses) - main)
    if leaked:
        problems.append(f"{len(leaked)} auxiliary tensor(s) leaked into the deploy model, e.g. {leaked[0]}")
    dropped = [k for k in dual_sd if k not in uses]
    account = TransferAccount(
        used=len(uses),
        dropped=len(dropped),
        main_keys=len(main),
        dropped_bytes=sum(dual_sd[k].numel() * dual_sd[k].element_size() for k in dropped),
        problems=problems,
    )
    return out, account
