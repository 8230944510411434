"""Training data: corpora of token sequences, the epoch order, anchors and blocks with their labels (spec §9.1-§9.3),
the training visibility mask, and the optional on-disk cache of target features (spec §9.2).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.errors import UsageError

# ------------------------------------------------------------------------------------------------- anchors, blocks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Blocks:
    """All blocks of a batch of sequences (spec §9.3). `anchors` axis = num_anchors, `slots` = block_size.

    anchors: i32[batch, anchors] (ascending among active blocks; 0 for inactive ones); keep: bool[batch, anchors];
    tokens: i32[batch, anchors, slots] block inputs [y_a, M, ..., M] (slot 0 of an inactive block is M too);
    positions: i32[batch, anchors, slots] = a + j; prev_tokens: i32[batch, anchors, slots] teacher-forced previous
    token of each slot (y_{a+j}); labels: i32[batch, anchors, slots] = y[min(a+j+1, S-1)] (y_0 for inactive
    blocks); target_index: i32[batch, anchors, slots] = min(a+j, S-2) (0 for inactive blocks), the row of the
    target's last hidden state that gives pi_j; eval_mask: bool[batch, anchors, slots] supervision v_j;
    loss_weights: f32[batch, anchors, slots] = v_j * exp(-j / gamma).
    """

    anchors: jax.Array
    keep: jax.Array
    tokens: jax.Array
    positions: jax.Array
    prev_tokens: jax.Array
    labels: jax.Array
    target_index: jax.Array
    eval_mask: jax.Array
    loss_weights: jax.Array


def candidate_anchors(loss_mask: jax.Array) -> jax.Array:
    """bool[batch, seq]: position a is a candidate iff loss_mask[a] and loss_mask[a + 1] (spec §9.3.1)."""
    m = loss_mask.astype(bool)
    return m & jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)


def sample_anchors(loss_mask: jax.Array, num_anchors: int, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Draw min(num_anchors, #candidates) distinct candidates per row uniformly, sorted ascending (spec §9.3.2).

    loss_mask: [batch, seq]; keys: one PRNG key per row [batch]. Returns (anchors i32[batch, anchors],
    keep bool[batch, anchors]); inactive entries come last with anchor 0.
    """
    cand = candidate_anchors(loss_mask)
    b, s = cand.shape
    width = max(s, num_anchors)
    # The top-k of iid uniform scores over the candidates is a uniformly random subset of them.
    scores = jax.vmap(lambda k: jax.random.uniform(k, (s,)))(keys)
    scores = jnp.where(cand, scores, -1.0)
    scores = jnp.pad(scores, ((0, 0), (0, width - s)), constant_values=-1.0)
    top, idx = jax.lax.top_k(scores, num_anchors)
    keep = top >= 0.0
    order = jnp.sort(jnp.where(keep, idx, width), axis=1)  # active anchors ascending, inactive last
    keep = order < width
    return jnp.where(keep, order, 0).astype(jnp.int32), keep


def build_blocks(
    tokens: jax.Array,
    loss_mask: jax.Array,
    anchors: jax.Array,
    keep: jax.Array,
    *,
    block_size: int,
    mask_token_id: int,
    loss_decay_gamma: float = 4.0,
) -> Blocks:
    """Inputs, positions, labels, supervision and weights of every block (spec §9.3.3-§9.3.6, §9.4).

    tokens: i32[batch, seq]; loss_mask: [batch, seq] (0/1); anchors: i32[batch, anchors]; keep: bool[batch, anchors].
    Inactive blocks follow the reference: anchor 0, slot-0 input M, label and pi-row index 0, no supervision.
    """
    s = tokens.shape[1]
    slots = jnp.arange(block_size, dtype=jnp.int32)
    anchors = jnp.where(keep, anchors, 0).astype(jnp.int32)
    kept = keep[..., None]
    positions = anchors[..., None] + slots  # [b, n, j]
    label_pos = positions + 1

    def gather(rows, index):  # rows [b, s], index [b, n, j] -> [b, n, j]
        return jax.vmap(lambda r, i: r[i])(rows, index)

    label_index = jnp.where(kept, jnp.minimum(label_pos, s - 1), 0)
    labels = gather(tokens, label_index).astype(jnp.int32)
    label_ok = (label_pos < s) & gather(loss_mask.astype(bool), jnp.minimum(label_pos, s - 1)) & kept
    eval_mask = jnp.cumprod(label_ok.astype(jnp.int32), axis=-1).astype(bool)  # contiguous prefix only
    loss_weights = eval_mask * jnp.exp(-slots.astype(jnp.float32) / loss_decay_gamma)
    anchor_tokens = gather(tokens, anchors).astype(jnp.int32)  # [b, n]
    masks = jnp.full(positions.shape, mask_token_id, jnp.int32)
    block_tokens = masks.at[..., 0].set(jnp.where(keep, anchor_tokens, mask_token_id))
    prev_tokens = jnp.concatenate([anchor_tokens[..., None], labels[..., :-1]], axis=-1)
    target_index = jnp.where(kept, jnp.minimum(positions, s - 2), 0)
    return Blocks(
        anchors,
        keep,
        block_tokens,
        positions,
        prev_tokens,
        labels,
        target_index,
        eval_mask,
        loss_weights.astype(jnp.float32),
    )


def training_mask(anchors: jax.Array, keep: jax.Array, seq_len: int, block_size: int) -> jax.Array:
    """Dense visibility of the training forward (spec §4.4, §9.3.7): bool[batch, anchors*slots, seq + anchors*slots].

    Row b*B + j is slot j of block b. Columns: the seq context rows, then every block row in the same order.

        block b (anchor a_b):  context t < a_b  |  own block's B slots (both directions)  |  nothing else
        inactive block:        nothing at all (the attention output of such a row is zero)
    """
    bsz, n = anchors.shape
    ctx = (jnp.arange(seq_len)[None, None, :] < anchors[:, :, None]) & keep[:, :, None]  # [b, n, s]
    ctx = jnp.repeat(ctx, block_size, axis=1)  # [b, n*B, s]
    block_id = jnp.arange(n * block_size) // block_size
    same = block_id[:, None] == block_id[None, :]  # [n*B, n*B]
    own = same[None] & jnp.repeat(keep, block_size, axis=1)[:, :, None]  # [b, n*B, n*B]
    return jnp.concatenate([ctx, own], axis=-1)


def position_ids(positions: jax.Array, seq_len: int) -> jax.Array:
    """i32[batch, seq + anchors*slots]: context positions 0..seq-1, then each block's a+j (the keys' positions)."""
    bsz = positions.shape[0]
    ctx = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (bsz, seq_len))
    return jnp.concatenate([ctx, positions.reshape(bsz, -1)], axis=1)


# -------------------------------------------------------------------------------------------------------- corpora


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Sequences padded to one static length. tokens: i32[num_seqs, seq]; loss_mask: u8[num_seqs, seq]
    (0 on padding); lengths: i32[num_seqs]."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]


def _pack(rows: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> Corpus:
    tokens = np.zeros((len(rows), seq_len), np.int32)
    mask = np.zeros((len(rows), seq_len), np.uint8)
    lengths = np.zeros((len(rows),), np.int32)
    for i, (ids, m) in enumerate(rows):
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = m
        lengths[i] = len(ids)
    return Corpus(tokens, mask, lengths)


def load_corpus(
    path: str,
    seq_len: int,
    *,
    tokenizer_path: str | None = None,
    min_supervised: int = 1,
    vocab_size: int | None = None,
) -> Corpus:
    """Read training sequences.

    `path` is either a .jsonl file with one {"input_ids": [...] (or "ids"), "loss_mask": [...] (optional)} per line,
    or a folder of *.txt files, each tokenized with `tokenizer_path` (a tokenizers `tokenizer.json`). A row with a
    loss mask (e.g. a chat with supervised assistant turns) is truncated to seq_len (spec §9.1.3); a row without one
    and each text file are plain token streams, cut into consecutive windows of seq_len tokens, all supervised.
    Sequences with fewer than `min_supervised` supervised tokens are dropped (spec §9.1.4).
    """
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    if os.path.isfile(path) and path.endswith(".jsonl"):
        for n, row, ids in jsonl_token_rows(path):
            ids = np.asarray(ids, np.int64)
            if "loss_mask" not in row:
                rows += _windows(ids, seq_len)
                continue
            mask = np.asarray(row["loss_mask"], np.int64)
            if ids.ndim != 1 or mask.shape != ids.shape:
                raise UsageError(f"--data {path} line {n}: loss_mask must have one 0/1 entry per input id")
            rows.append((ids[:seq_len], mask[:seq_len]))
    elif os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".txt"))
        if not files:
            raise UsageError(f"--data folder {path!r} holds no *.txt files")
        if tokenizer_path is None or not os.path.isfile(tokenizer_path):
            raise UsageError(f"text data needs a tokenizer.json; {tokenizer_path!r} does not exist (pass --tokenizer)")
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(tokenizer_path)
        for name in files:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                rows += _windows(np.asarray(tok.encode(f.read(), add_special_tokens=False).ids, np.int64), seq_len)
    else:
        raise UsageError(f"--data must be a .jsonl file of token ids or a folder of .txt files, got {path!r}")
    for i, (ids, mask) in enumerate(rows):
        if ids.size and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
            raise UsageError(f"--data sequence {i} holds token id {int(ids.max())} outside [0, {vocab_size})")
        if not np.isin(mask, (0, 1)).all():
            raise UsageError(f"--data sequence {i}: loss_mask entries must be 0 or 1")
    rows = [r for r in rows if int(r[1].sum()) >= min_supervised and len(r[0]) >= 2]
    if not rows:
        raise UsageError(f"--data {path!r} yields no sequence with at least {min_supervised} supervised tokens")
    return _pack(rows, seq_len)


def jsonl_token_rows(path: str):
    """Yield (line number, row, ids) for each non-empty line of a .jsonl whose rows are objects with an
    "input_ids" (or "ids") list; a line that is not JSON or has no such list is a UsageError naming it."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise UsageError(f"--data {path} line {n} is not JSON") from None
            ids = row.get("input_ids", row.get("ids")) if isinstance(row, dict) else None
            if not isinstance(ids, list):
                raise UsageError(f"--data {path} line {n} needs an 'input_ids' (or 'ids') list of token ids")
            yield n, row, ids


def _windows(ids: np.ndarray, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(ids[i : i + seq_len], np.ones_like(ids[i : i + seq_len])) for i in range(0, len(ids), seq_len)]


def steps_per_epoch(num_seqs: int, global_batch: int) -> int:
    """floor(#sequences / global batch) (spec §9.5)."""
    return num_seqs // global_batch


def batch_indices(step: int, num_seqs: int, global_batch: int, seed: int) -> np.ndarray:
    """Sequence ids of update `step`: epoch e = step // steps_per_epoch uses permutation(seed + e) truncated to a
    multiple of the global batch (spec §9.5). A pure function of the step, so a resumed run sees the same data."""
    per_epoch = steps_per_epoch(num_seqs, global_batch)
    epoch, i = divmod(step, per_epoch)
    return _epoch_order(num_seqs, seed + epoch)[i * global_batch : (i + 1) * global_batch]


@functools.lru_cache(maxsize=2)
def _epoch_order(num_seqs: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(num_seqs)


def corpus_fingerprint(corpus: Corpus) -> str:
    """sha1 of the padded tokens and loss masks: identifies the data a feature cache was computed from."""
    h = hashlib.sha1()
    for a in (corpus.tokens, corpus.loss_mask):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- target feature cache


class FeatureCache:
    """Per-sequence target features on disk (spec §9.2): `{id:08d}.npz` with `features` [seq, taps*hidden] and
    `last_hidden` [seq, hidden]. bfloat16 arrays are stored as their uint16 bit patterns (npz has no bf16).

    `signature` (target, taps, dtype, corpus fingerprint, ...) is written to `cache.json` on first use; a folder
    written for anything else is refused rather than silently reused.
    """

    MANIFEST = "cache.json"

    def __init__(self, folder: str, signature: dict):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, self.MANIFEST)
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            if saved != signature:
                diff = sorted(k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k))
                raise UsageError(
                    f"feature cache {folder!r} was computed for other settings (differs in "
                    f"{', '.join(diff)}); use another folder or delete it"
                )
        else:
            with open(path, "w") as f:
                json.dump(signature, f, indent=1)

    def path(self, seq_id: int) -> str:
        return os.path.join(self.folder, f"{int(seq_id):08d}.npz")

    def has(self, seq_id: int) -> bool:
        return os.path.isfile(self.path(seq_id))

    def save(self, seq_id: int, features: np.ndarray, last_hidden: np.ndarray) -> None:
        dtype = str(features.dtype)
        arrays = {"dtype": np.asarray(dtype)}
        for name, a in (("features", features), ("last_hidden", last_hidden)):
            arrays[name] = a.view(np.uint16) if dtype == "bfloat16" else a
        tmp = self.path(seq_id) + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self.path(seq_id))  # readers never see half a file

    def load(self, seq_id: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.path(seq_id)) as z:
            dtype = str(z["dtype"])
            out = tuple(z[n] for n in ("features", "last_hidden"))
        if dtype == "bfloat16":
            import ml_dtypes

            out = tuple(a.view(ml_dtypes.bfloat16) for a in out)
        return out
