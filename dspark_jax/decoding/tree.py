"""Draft trees (trees §3): level-synchronous beam expansion of a DSpark / DFlash block into a static-shape tree.

The draft backbone runs once per round as for a chain ([anchor, M, ..., M] gives h_d, u_d shared by every branch);
only the sequential head depends on the branch: logits_c = u_d + beta_d(x_par(c), h_d, state_par(c)). Level d
expands the W best candidates of level d - 1 (the anchor at d = 0) into K children each; the tree is the N best
candidates overall under the key (score desc, creation index asc), which is closed under ancestors and earlier
siblings, and a sampled node's membership never depends on its own token (losslessness conditions L1/L2, trees §1).

Nodes are ordered (not verified, depth, path key): topological, depth-major, siblings contiguous in draw order and
the verified set an index prefix, so the chain acceptance kernel (parents array) verifies it unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.errors import UsageError
from dspark_jax.models.draft import Draft
from dspark_jax.sampling import SamplingParams, as_params, probabilities

MODES = ("auto", "topk", "swor", "iid")
SCORES = ("auto", "prob", "conf")
MAX_BRANCH = 21  # path keys are < K^B in int32 (B <= 7)
RANK_FACTOR_FALLBACK = 0.5  # c_{d,r} = 0.5^r until measured (trees §3)
TOPK, SWOR, IID = 0, 1, 2  # per-row mode codes


@dataclasses.dataclass(frozen=True)
class TreeConfig:
    """Static tree shape and drafting rule (a LoopSpec field, so it keys the compiled loop).

    nodes N: node budget; branch K: children per expanded node; beam W <= K: nodes expanded per level.
    mode: "topk" (deterministic candidates, one-hot rows), "swor" (Gumbel top-k = sampling without replacement,
    rows conditioned on earlier siblings), "iid" (K independent draws, shared row), "auto" = topk for greedy rows,
    swor for sampled rows. score: "prob" (sum of log p, topk only), "conf" (log sigmoid(z / t_d) + log c_{d,r}),
    "auto" = prob for greedy rows, conf for sampled rows. rank_factors: c_{d,r} as a [B][K] tuple (None: 0.5^r);
    temperatures: the confidence temperatures t_d (None: ones).
    """

    nodes: int = 15
    branch: int = 4
    beam: int = 4
    mode: str = "auto"
    score: str = "auto"
    rank_factors: tuple | None = None
    temperatures: tuple | None = None

    def __post_init__(self):
        for name in ("nodes", "branch", "beam"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UsageError(f"tree {name} must be a positive integer, got {v!r}")
        if self.branch > MAX_BRANCH:
            raise UsageError(f"tree branch must be at most {MAX_BRANCH}, got {self.branch}")
        if self.beam > self.branch:
            raise UsageError(f"tree beam must be at most the branch factor {self.branch}, got {self.beam}")
        if self.mode not in MODES:
            raise UsageError(f"tree mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.score not in SCORES:
            raise UsageError(f"tree score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.score == "prob" and self.mode not in ("topk", "auto"):
            raise UsageError(
                f"tree score 'prob' needs mode topk or auto (it would prune sampled nodes), got {self.mode!r}"
            )

    @classmethod
    def parse(cls, text: str, mode: str = "auto") -> "TreeConfig":
        """From the CLI form `N[,K[,W]]` (K defaults to 4 capped at N, W to K)."""
        try:
            parts = [int(x) for x in str(text).split(",")]
        except ValueError:
            parts = []
        if not 1 <= len(parts) <= 3:
            raise UsageError(f"tree must be N[,K[,W]] with positive integers, got {text!r}")
        n = parts[0]
        k = parts[1] if len(parts) > 1 else min(4, max(n, 1))
        w = parts[2] if len(parts) > 2 else k
        return cls(n, k, w, mode)

    def capacity(self, block: int) -> int:
        """C = K + (B - 1) W K candidates a block of B slots can create."""
        return self.branch + (block - 1) * self.beam * self.branch

    def check(self, block: int) -> None:
        if self.nodes > self.capacity(block):
            raise UsageError(
                f"tree nodes must be at most K + (B-1)*W*K = {self.capacity(block)} for branch {self.branch}, "
                f"beam {self.beam} and block {block}, got {self.nodes}"
            )

    def factors(self, block: int) -> jax.Array:
        """f32[B, K] per-depth, per-rank factors c_{d,r} (c_{d,0} = 1, non-increasing in r)."""
        if self.rank_factors is None:
            row = [RANK_FACTOR_FALLBACK**r for r in range(self.branch)]
            return jnp.asarray([row] * block, jnp.float32)
        return jnp.asarray(self.rank_factors, jnp.float32).reshape(block, self.branch)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TreeProposal:
    """A round's tree per row (trees §3 "Tree arrays"); N nodes in depth-major order.

    tokens, parents (-1 = anchor, parents[j] < j), depth, rank: i32[b, N]; score f32[b, N] (-inf = invalid);
    conf_logits f32[b, N]; num_verify i32[b] (nodes [0, N_v) are verified); expansion i32[b, N] (the expansion that
    drew each node); laws f32[b, E, V] the law p each expansion drew from (E = 1 + (B-1) W); drawn i32[b, E, K] the
    tokens each expansion drew, in draw order; row_mode i32[b] (TOPK / SWOR / IID); hidden [b, B, H].
    """

    tokens: jax.Array
    parents: jax.Array
    depth: jax.Array
    rank: jax.Array
    score: jax.Array
    conf_logits: jax.Array
    num_verify: jax.Array
    expansion: jax.Array
    laws: jax.Array
    drawn: jax.Array
    row_mode: jax.Array
    hidden: jax.Array

    def rows(self) -> jax.Array:
        """f32[b, N, V] D_c, the law each node's token was drawn from given everything drawn before it (L1):
        topk one_hot(x); swor p without the earlier siblings' tokens, renormalised; iid p."""
        vocab = self.laws.shape[-1]
        p = jnp.take_along_axis(self.laws, self.expansion[:, :, None], axis=1)  # [b, N, V]
        drawn = jnp.take_along_axis(self.drawn, self.expansion[:, :, None], axis=1)  # [b, N, K]
        earlier = jnp.arange(drawn.shape[-1])[None, None, :] < self.rank[:, :, None]  # [b, N, K]
        idx = jnp.where(earlier, drawn, vocab)  # vocab = out of range: dropped
        keep = jnp.ones(p.shape, bool)
        b, n = self.tokens.shape
        keep = keep.at[jnp.arange(b)[:, None, None], jnp.arange(n)[None, :, None], idx].set(False, mode="drop")
        kept = jnp.where(keep, p, 0.0)  # its mass is 1 - sum of the earlier siblings' p, summed without cancellation
        swor = kept / jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), 1e-30)
        onehot = jax.nn.one_hot(self.tokens, vocab, dtype=jnp.float32)
        mode = self.row_mode[:, None, None]
        return jnp.where(mode == TOPK, onehot, jnp.where(mode == SWOR, swor, p))


def _top(values: jax.Array, k: int) -> jax.Array:
    """i32[..., k] indices of the k largest under (value desc, index asc); lax.top_k keeps the lower index first."""
    return jax.lax.top_k(values, k)[1].astype(jnp.int32)


def build_tree(
    draft: Draft,
    hidden: jax.Array,
    anchors: jax.Array,
    sampling: SamplingParams,
    keys: jax.Array | None,
    tree: TreeConfig,
    room: jax.Array,
    thresholds: jax.Array | None = None,
    policy=None,
) -> TreeProposal:
    """Expand one block per row into a tree (trees §3) and choose the verified prefix (trees §6, full / threshold).

    hidden: [b, B, H] the draft backbone's output; anchors: i32[b]; sampling: per-row settings; keys: per-row keys
    [b] (None only when every row is greedy); room: i32[b] depth limit (nodes with depth >= room are never
    verified); thresholds: f32[b] verify thresholds (a node is verified iff sigmoid(z) >= threshold on its whole
    path; None or 0 = all valid nodes); policy: None, or a batch-wide verify policy (trees §6 scheduler)
    `policy(score f32[b, N], eligible bool[b, N]) -> verified bool[b, N]` on each row's nodes in score-rank order
    (score desc, creation index asc), eligible = valid, in room and passing the threshold.
    """
    sampling = as_params(sampling)
    b, block = hidden.shape[:2]
    n_nodes, kk, ww = tree.nodes, tree.branch, tree.beam
    tree.check(block)
    base = draft.base_logits(hidden)  # f32[b, B, V]
    vocab = base.shape[-1]
    greedy = jnp.broadcast_to(sampling.greedy, (b,))
    # Greedy rows always take the top-k candidates: their p is one-hot, so sampling modes degenerate there.
    sampled_mode = {"auto": SWOR, "topk": TOPK, "swor": SWOR, "iid": IID}[tree.mode]
    row_mode = jnp.where(greedy, TOPK, sampled_mode).astype(jnp.int32)
    use_prob = greedy if tree.score == "auto" else jnp.full((b,), tree.score == "prob")
    factors = jnp.log(tree.factors(block))  # [B, K]
    temps = jnp.ones((block,), jnp.float32) if tree.temperatures is None else jnp.asarray(tree.temperatures)
    thresholds = jnp.zeros((b,), jnp.float32) if thresholds is None else thresholds
    has_conf = draft.config.enable_confidence_head
    rows = jnp.arange(b)

    # Parents of the level being expanded ([b, P]; P = 1 at level 0).
    prev_tok = anchors[:, None].astype(jnp.int32)
    prev_state = draft.init_head_state((b, 1))
    prev_score = jnp.zeros((b, 1), jnp.float32)
    prev_key = jnp.zeros((b, 1), jnp.int32)
    prev_cand = jnp.full((b, 1), -1, jnp.int32)
    prev_ok = jnp.ones((b, 1), bool)  # threshold policy: every sigmoid(z) on the path >= threshold
    cands = {k: [] for k in ("token", "parent", "depth", "rank", "key", "score", "z", "ok")}
    laws, drawn = [], []
    offset = 0
    for d in range(block):
        width = prev_tok.shape[1]
        h = jnp.broadcast_to(hidden[:, d, None, :], (b, width, hidden.shape[-1]))
        u = jnp.broadcast_to(base[:, d, None, :], (b, width, vocab))
        logits, z, state = draft.slot_head(h, u, prev_tok, prev_state)  # [b, P, V], [b, P] | None, [b, P, r]
        z = jnp.zeros((b, width), jnp.float32) if z is None else z
        p = probabilities(logits, sampling)  # the law sampled rows draw from (the target's settings)
        # Greedy rows rank by the logits (rank 0 = the chain's argmax, ties to the lower id) and score with the
        # untempered softmax; their p is one-hot, which would make every rank >= 1 look impossible.
        logp_bar = jnp.where(greedy[:, None, None], jax.nn.log_softmax(logits, -1), jnp.log(p))
        rank_by = jnp.where(greedy[:, None, None], logits, p)
        top_tok = _top(rank_by, kk)

        def sampled(p=p, top_tok=top_tok, d=d, width=width):
            lk = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, d), 2))(keys)
            gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (width, vocab)))(lk[:, 0])
            # Gumbel top-k = K draws without replacement, in draw order (rank = draw order).
            swor_tok = _top(jnp.where(p > 0, jnp.log(p) + gumbel, -jnp.inf), kk)
            iid_tok = jax.vmap(lambda k, lp: jax.random.categorical(k, lp, shape=(kk, width)))(lk[:, 1], jnp.log(p))
            iid_tok = jnp.swapaxes(iid_tok, 1, 2).astype(jnp.int32)
            mode = row_mode[:, None, None]
            return jnp.where(mode == TOPK, top_tok, jnp.where(mode == SWOR, swor_tok, iid_tok))

        tok = top_tok if keys is None else jax.lax.cond(jnp.all(row_mode == TOPK), lambda t=top_tok: t, sampled)
        logp_bar_x = jnp.take_along_axis(logp_bar, tok, axis=2)  # [b, P, K]
        p_x = jnp.take_along_axis(p, tok, axis=2)
        valid = jnp.where((row_mode == TOPK)[:, None, None], jnp.isfinite(logp_bar_x), p_x > 0)
        valid = valid & jnp.isfinite(prev_score)[:, :, None]
        log_q = jax.nn.log_sigmoid(z / temps[d]) if has_conf else jnp.zeros_like(z)
        conf_score = prev_score[:, :, None] + log_q[:, :, None] + factors[d][None, None, :]
        prob_score = prev_score[:, :, None] + logp_bar_x
        score = jnp.where(valid, jnp.where(use_prob[:, None, None], prob_score, conf_score), -jnp.inf)
        ok = prev_ok & (jax.nn.sigmoid(z) >= thresholds[:, None]) if has_conf else prev_ok
        r = jnp.arange(kk, dtype=jnp.int32)[None, None, :]
        flat = (b, width * kk)
        level = {
            "token": tok.reshape(flat),
            "parent": jnp.broadcast_to(prev_cand[:, :, None], tok.shape).reshape(flat),
            "depth": jnp.full(flat, d, jnp.int32),
            "rank": jnp.broadcast_to(r, tok.shape).reshape(flat),
            "key": (prev_key[:, :, None] * kk + r).reshape(flat),
            "score": score.reshape(flat),
            "z": jnp.broadcast_to(z[:, :, None], tok.shape).reshape(flat),
            "ok": jnp.broadcast_to(ok[:, :, None], tok.shape).reshape(flat),
        }
        for name, v in level.items():
            cands[name].append(v)
        laws.append(p)
        drawn.append(tok)
        if d + 1 < block:
            beam = _top(level["score"], ww)  # [b, W] within this level
            prev_tok = jnp.take_along_axis(level["token"], beam, axis=1)
            prev_state = jnp.take_along_axis(state, (beam // kk)[:, :, None], axis=1)
            prev_score = jnp.take_along_axis(level["score"], beam, axis=1)
            prev_key = jnp.take_along_axis(level["key"], beam, axis=1)
            prev_ok = jnp.take_along_axis(level["ok"], beam, axis=1)
            prev_cand = offset + beam
        offset += width * kk

    cand = {name: jnp.concatenate(v, axis=1) for name, v in cands.items()}  # [b, C]
    sel = _top(cand["score"], n_nodes)  # [b, N] candidate ids, best first
    got = {name: jnp.take_along_axis(v, sel, axis=1) for name, v in cand.items()}
    verified = jnp.isfinite(got["score"]) & (got["depth"] < room[:, None]) & got["ok"]
    if policy is not None:  # between selection and ordering: it sees the score-ranked lists (trees §6)
        verified = policy(got["score"], verified)
    # Depth-major order with the verified set first; path keys are unique within a depth.
    order = jax.vmap(lambda k, dep, nv: jnp.lexsort((k, dep, nv)))(got["key"], got["depth"], ~verified)
    order = order.astype(jnp.int32)
    node_cand = jnp.take_along_axis(sel, order, axis=1)
    node = {name: jnp.take_along_axis(v, order, axis=1) for name, v in got.items()}
    inverse = jnp.full(cand["score"].shape, -1, jnp.int32)
    inverse = inverse.at[rows[:, None], node_cand].set(jnp.arange(n_nodes, dtype=jnp.int32)[None, :])
    parent_cand = node["parent"]
    parents = jnp.where(parent_cand >= 0, jnp.take_along_axis(inverse, jnp.maximum(parent_cand, 0), axis=1), -1).astype(
        jnp.int32
    )
    return TreeProposal(
        tokens=node["token"],
        parents=parents,
        depth=node["depth"],
        rank=node["rank"],
        score=node["score"],
        conf_logits=node["z"],
        num_verify=jnp.sum(verified, axis=1).astype(jnp.int32),
        expansion=node_cand // kk,
        laws=jnp.concatenate(laws, axis=1),
        drawn=jnp.concatenate(drawn, axis=1),
        row_mode=row_mode,
        hidden=hidden,
    )
