"""An ensemble's weights, member by member: each member trains as a one-member model, and
the served model holds all of them (every table `members` times as wide, member m in the
m-th column slice; one MLP per member and tower)."""

from torch import Tensor, cat, stack

from training.model import ModelSpec
from training.warm_start import WarmStart

TABLES = "ebc.embedding_bags."
MLPS = ("user_mlps.", "item_mlps.")


def _member_key(key: str, member: int) -> str | None:
    """`user_mlps.<member>.…` -> `user_mlps.0.…`; None for another member's MLP."""
    for prefix in MLPS:
        if key.startswith(prefix):
            index, _, rest = key.removeprefix(prefix).partition(".")
            return f"{prefix}0.{rest}" if int(index) == member else None
    return key


def member_state(state: dict[str, Tensor], spec: ModelSpec, member: int) -> dict[str, Tensor]:
    """Member `member`'s weights as a one-member model's."""
    members = spec.members
    out = {}
    for key, value in state.items():
        name = _member_key(key, member)
        if name is None:
            continue
        if key.startswith(TABLES):
            width = value.shape[1] // members
            value = value[:, member * width : (member + 1) * width]
        out[name] = value.contiguous()
    return out


def join_states(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One-member models' weights -> the ensemble's (the inverse of `member_state`)."""
    joined: dict[str, Tensor] = {}
    for key in states[0]:
        if key.startswith(TABLES):
            joined[key] = cat([state[key] for state in states], dim=1)
        elif key.startswith(MLPS):
            prefix, _, rest = key.partition(".0.")
            for m, state in enumerate(states):
                joined[f"{prefix}.{m}.{rest}"] = state[key]
        else:
            joined[key] = states[0][key]
    return joined


def join_row_states(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Row-wise Adagrad keeps one accumulator per row: the members' average stands for
    the joined row (a warm start hands it to every member again)."""
    return {key: stack([state[key] for state in states]).mean(0) for key in states[0]}


def member_warm_start(warm: WarmStart, spec: ModelSpec, member: int) -> WarmStart:
    return WarmStart(member_state(warm.weights, spec, member), warm.row_state)
