"""Concept vectors per block: RFM (the paper's), ridge, logistic, difference of means, PCA of paired differences.

Every method maps a block's features X (n, d) at the selected token and labels y (n,) to one unit
vector v (d,), with its sign set *per block* so that prefixed examples project higher than unprefixed
ones at that block (the authors' code sets every block's sign from the last block; not copied here).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..cache import save_tensors
from .llamacpp import read_control_vector, write_control_vector
from .protocol import Protocol
from .steering import steer

METHODS = ("rfm", "linear", "logistic", "mean_difference", "pca")
RFM_BANDWIDTHS = (1.0, 10.0, 100.0)
# The RFM's kernel solve is cubic and its updates quadratic in examples: above this many (the full profile, or
# class-contrastive training on many statements) it fits a seeded subsample with the same share of positives.
# Every default-profile fit (at most 320 examples) is below it, so the cap changes none of their vectors.
RFM_MAX_EXAMPLES = 512


# --- RFM -------------------------------------------------------------------------------------------
# M stays in factored form M = F^T F with F (n, d): every M of the iteration is an average of n
# gradient outer products, so distances, gradients and the top eigenvector cost O(n^2 d), not O(n d^2),
# and many (block, bandwidth, normalisation) fits run as one batch.
def _solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched solve of the SPD systems (K + reg I) alpha = y, A (B, n, n), b (B, n, 1), by Cholesky in float64.

    K is a Laplace kernel matrix (positive semi-definite) plus reg I, so the Cholesky factor always exists. Not LU
    (`torch.linalg.solve`): MKL's batched LU with pivoting failed on such systems ("Pivots given to lu_solve ...",
    "Parameter 6 was incorrect on entry to SLASWP") and once hung for minutes; Cholesky does no pivoting.
    float64, not float32: float32 Cholesky can break down when rounding exceeds reg (n large), and float64 keeps
    the committed results (made with float32 LU) reproducible: 900 of 900 responses of 15 concepts identical,
    against 298 of 300 with float32 Cholesky. It costs ~40 ms more per solve of 90 systems of 205 (measured).
    """
    if not torch.isfinite(A).all():
        raise ValueError("An RFM kernel matrix contains NaN or inf; the features do: check the extracted activations.")
    factor, info = torch.linalg.cholesky_ex(A.double())
    if info.any():
        raise ValueError(
            f"An RFM kernel system is not positive definite (Cholesky failed at column {int(info.max())}); raise reg."
        )
    return torch.cholesky_solve(b.double(), factor).to(A.dtype)


def _agop_factor(X: torch.Tensor, y: torch.Tensor, bandwidth: torch.Tensor, reg: float, iters: int) -> torch.Tensor:
    """Batched RFM: X (B, n, d) centred, y (B, n), bandwidth (B,) -> F (B, n, d) with M = F^T F (max entry 1)."""
    B, n, _ = X.shape
    L = bandwidth.to(X.dtype)[:, None, None]
    eye = torch.eye(n, dtype=X.dtype)
    F = None  # M = I before the first update
    for _ in range(iters):
        P = X if F is None else X @ F.transpose(1, 2)  # ||x_i - x_j||_M = ||P_i - P_j||
        sq = (P * P).sum(-1)
        dist = (sq[:, :, None] + sq[:, None, :] - 2 * P @ P.transpose(1, 2)).clamp(min=0).sqrt()  # (B, n, n)
        K = torch.exp(-dist / L)
        alpha = _solve(K + reg * eye, y[..., None])[..., 0]  # (B, n)
        # grad_x exp(-||x-z||_M / L) = -K / (L ||x-z||_M) M (x - z); undefined at x = z, set to 0 there.
        W = torch.where(dist > 0, K / dist.clamp(min=1e-12), torch.zeros_like(K)) / L * alpha[:, None, :]
        AX = W.sum(-1, keepdim=True) * X - W @ X  # (B, n, d): sum_j W_ij (x_i - x_j)
        G = -(AX if F is None else (AX @ F.transpose(1, 2)) @ F)  # (B, n, d): gradients, times M
        G = G - G.mean(1, keepdim=True)  # centred over samples
        max_diag = (G * G).sum(1).amax(-1) / n  # max of M = G^T G / n sits on its (PSD) diagonal
        F = G / (n * max_diag).clamp(min=torch.finfo(X.dtype).tiny).sqrt()[:, None, None]
    return F


def rfm_agop(X: torch.Tensor, y: torch.Tensor, bandwidth: float, reg: float = 1e-3, iters: int = 10) -> torch.Tensor:
    """The d×d AGOP matrix of a Laplace-kernel RFM after `iters` updates.

    X (n, d) is centred by its column means (no row normalisation here); M starts at the identity.
    Each update: K = exp(-||x - z||_M / L); alpha = (K + reg I)^-1 y; the gradient of
    f(x) = sum_j alpha_j K(x, z_j) at each training point; M = mean outer product of the
    gradients centred over samples, scaled by its maximum.
    """
    X = X.double() - X.double().mean(0)
    if iters == 0:
        return torch.eye(X.shape[1], dtype=torch.float64)
    F = _agop_factor(X[None], y.double().reshape(1, -1), torch.tensor([float(bandwidth)]), reg, iters)[0]
    return F.T @ F


def _top_directions(F: torch.Tensor) -> torch.Tensor:
    """Top eigenvector of M = F^T F for each batch item, via the small (n, n) Gram matrix: (B, d)."""
    # float64: batched float32 eigh is ~100x slower than float64 on CPU in torch 2.13 (measured).
    u = torch.linalg.eigh((F @ F.transpose(1, 2)).double())[1][..., -1].to(F.dtype)  # (B, n)
    v = (F.transpose(1, 2) @ u[..., None])[..., 0]
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _correlations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation along the last axis (0 where either side is constant)."""
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(denom > 0, (a * b).sum(-1) / denom.clamp(min=1e-12), torch.zeros_like(denom))


def split_indices(
    n: int, val_fraction: float = 0.2, max_val: int = 256, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train/held-out split of n examples (held-out: val_fraction of them, at most max_val)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, min(max_val, int(round(val_fraction * n))))
    return order[n_val:], order[:n_val]


def stratified_subsample(is_positive: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of k of the n examples, seeded, keeping the share of positives (at least one of each kind)."""
    positives, negatives = torch.nonzero(is_positive).flatten(), torch.nonzero(~is_positive).flatten()
    k_pos = min(len(positives), max(1, round(k * len(positives) / len(is_positive))))
    k_neg = min(len(negatives), k - k_pos)
    generator = torch.Generator().manual_seed(seed)
    keep = [
        idx[torch.randperm(len(idx), generator=generator)[:m]] for idx, m in ((positives, k_pos), (negatives, k_neg))
    ]
    return torch.cat(keep).sort().values


def fit_rfm(
    X: torch.Tensor,
    y: torch.Tensor,
    bandwidths=RFM_BANDWIDTHS,
    reg: float = 1e-3,
    iters: int = 10,
    seed: int = 0,
    max_examples: int | None = RFM_MAX_EXAMPLES,
) -> tuple[torch.Tensor, list[dict]]:
    """RFM vectors of all blocks at once: X (n, n_blocks, d), y (n, n_blocks) -> (n_blocks, d), details per block.

    Grid: bandwidth × row normalisation (unit-norm rows, or the block's states divided by their
    mean norm). A setting's score is |corr(held-out projections, held-out labels)|; the best wins per block.
    More than `max_examples` examples (None: no cap): a `stratified_subsample` of them (positive: any label > 0).
    """
    if max_examples is not None and len(X) > max_examples:
        keep = stratified_subsample((y > 0).any(1), max_examples, seed)
        X, y = X[keep], y[keep]
    n, n_blocks, d = X.shape
    train, val = split_indices(n, seed=seed)
    X = X.float().transpose(0, 1)  # (n_blocks, n, d)
    y = y.float().T  # (n_blocks, n)
    best_score = torch.full((n_blocks,), -1.0)
    best_v = torch.zeros(n_blocks, d)
    best_setting = [None] * n_blocks
    for row_normalise in (True, False):
        Xp = torch.nn.functional.normalize(X, dim=-1) if row_normalise else X / X.norm(dim=-1).mean(-1)[:, None, None]
        centre = Xp[:, train].mean(1, keepdim=True)
        Xc = Xp[:, train] - centre  # (n_blocks, n_train, d)
        # The RFM is rotation-equivariant and X's rows span at most n_train dimensions, so it runs
        # exactly in the coordinates of that row space (n_train instead of d columns): 2-3x faster.
        # float64 QR: batched float32 QR/SVD/eigh hit slow paths on CPU in torch 2.13 (measured).
        basis = torch.linalg.qr(Xc.transpose(1, 2).double())[0].transpose(1, 2).float()  # (n_blocks, n_train, d)
        k = len(bandwidths)
        Xb = (Xc @ basis.transpose(1, 2)).repeat_interleave(k, 0)  # (n_blocks k, n_train, r)
        yb = y[:, train].repeat_interleave(k, 0)
        L = torch.tensor(bandwidths, dtype=torch.float32).repeat(n_blocks)
        v_small = _top_directions(_agop_factor(Xb, yb, L, reg, iters)).view(n_blocks, k, -1)
        v = v_small @ basis  # back to (n_blocks, k, d)
        proj = torch.einsum("bnd,bkd->bkn", Xp[:, val] - centre, v)  # (n_blocks, k, n_val)
        score = _correlations(proj, y[:, val][:, None, :]).abs()  # (n_blocks, k)
        top, which = score.max(-1)
        for block in torch.nonzero(top > best_score).flatten().tolist():
            best_score[block] = top[block]
            best_v[block] = v[block, which[block]]
            best_setting[block] = {
                "bandwidth": bandwidths[which[block]],
                "row_normalise": row_normalise,
                "val_corr": round(top[block].item(), 6),
            }
    return best_v, best_setting


# --- Baselines -------------------------------------------------------------------------------------
def fit_linear(X: torch.Tensor, y: torch.Tensor, reg: float = 1e-3) -> torch.Tensor:
    """Ridge regression weights on unit-norm, centred features."""
    Xn = torch.nn.functional.normalize(X.double(), dim=1)
    Xc, yc = Xn - Xn.mean(0), y.double() - y.double().mean()
    return torch.linalg.solve(Xc.T @ Xc + reg * len(X) * torch.eye(X.shape[1], dtype=torch.float64), Xc.T @ yc).float()


def fit_logistic(X: torch.Tensor, y: torch.Tensor, reg: float = 1e-3, steps: int = 100) -> torch.Tensor:
    """L2-regularised logistic regression weights (soft targets allowed) on unit-norm features, by L-BFGS."""
    Xn = torch.nn.functional.normalize(X.double(), dim=1)
    Xc = Xn - Xn.mean(0)
    w = torch.zeros(X.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def loss_fn():
        optimiser.zero_grad()
        logits = Xc @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.double()) + reg * w[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(loss_fn)
    return w.detach()[:-1].float()


def fit_mean_difference(X: torch.Tensor, is_prefixed: torch.Tensor) -> torch.Tensor:
    """Mean of prefixed minus mean of unprefixed examples (CAA-style)."""
    return X[is_prefixed].mean(0) - X[~is_prefixed].mean(0)


def fit_pca(X: torch.Tensor, is_prefixed: torch.Tensor) -> torch.Tensor:
    """First principal direction of the paired differences (prefixed_i - unprefixed_i, same statement).

    Not centred: the concept's shift is the shared mean of the differences, which centring would remove.
    """
    diffs = (X[is_prefixed] - X[~is_prefixed]).double()
    return torch.linalg.svd(diffs, full_matrices=False)[2][0].float()


def orient(v: torch.Tensor, X: torch.Tensor, is_prefixed: torch.Tensor) -> torch.Tensor:
    """Unit vector with the sign that makes prefixed examples project higher than unprefixed ones."""
    v = v / v.norm().clamp(min=1e-12)
    gap = (X[is_prefixed] @ v).mean() - (X[~is_prefixed] @ v).mean()
    return -v if gap < 0 else v


def fit_vector(method: str, X: torch.Tensor, y: torch.Tensor, is_prefixed: torch.Tensor) -> torch.Tensor:
    """One block's oriented unit concept vector by a baseline `method` (RFM fits all blocks at once)."""
    X = X.float()
    if method == "linear":
        v = fit_linear(X, y)
    elif method == "logistic":
        v = fit_logistic(X, y)
    elif method == "mean_difference":
        v = fit_mean_difference(X, is_prefixed)
    elif method == "pca":
        v = fit_pca(X, is_prefixed)
    else:
        raise ValueError(f"Unknown vector method '{method}'; use one of: {', '.join(METHODS)}.")
    return orient(v, X, is_prefixed)


# --- Concept vectors -------------------------------------------------------------------------------
@dataclass
class ConceptVector:
    """Unit directions keyed by block, the blocks' typical hidden-state norms, and what produced them."""

    directions: dict[int, torch.Tensor]  # block -> (d,) unit vector
    norms: dict[int, float]  # block -> typical (median) hidden-state norm; eps is relative to it
    metadata: dict[str, str] = field(default_factory=dict)  # model, concept, method, token selection, labels

    def save(self, path: Path, model_hint: str | None = None) -> None:
        """Write as safetensors (one tensor per block, the metadata and norms in the header) or, for a `.gguf` path,
        as a llama.cpp control vector (`llama-cli --control-vector-scaled x.gguf:EPS`, docs/llamacpp.md)."""
        if Path(path).suffix == ".gguf":
            write_control_vector(Path(path), self.directions, self.norms, self.metadata, model_hint)
            return
        tensors = {f"block.{b}": v.float() for b, v in self.directions.items()}
        save_tensors(path, tensors, metadata={**self.metadata, "norms": json.dumps(self.norms)})

    @classmethod
    def load(cls, path: Path) -> "ConceptVector":
        """Read a vector written by `save` (safetensors, or a `.gguf` control vector)."""
        if Path(path).suffix == ".gguf":
            return cls(*read_control_vector(Path(path)))
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata())
        norms = {int(k): v for k, v in json.loads(metadata.pop("norms")).items()}
        directions = {int(k.split(".")[1]): v for k, v in load_file(path).items()}
        return cls(dict(sorted(directions.items())), norms, metadata)

    @property
    def protocol(self) -> Protocol | None:
        """The protocol the vector was trained and scaled under (`training.train` records its name in the metadata,
        which `save` keeps), or None for a vector made otherwise."""
        name = self.metadata.get("protocol")
        return Protocol.parse(name) if name else None

    def scaled(self, scaling: str, blocks: list[int]) -> "ConceptVector":
        """The vector with the norms that eps multiplies under a protocol's `scaling`: per block ('block_norm'), or
        ('mean_norm') their mean over `blocks`."""
        if scaling == "block_norm":
            return self
        mean = sum(self.norms[b] for b in blocks) / len(blocks)
        return ConceptVector(self.directions, {b: mean for b in self.norms}, dict(self.metadata, scaling=scaling))

    def random_like(self, seed: int) -> "ConceptVector":
        """The negative control: a seeded random unit direction per block, with this vector's blocks and norms, so
        it steers exactly as hard as the concept vector at every coefficient but towards no concept."""
        generator = torch.Generator().manual_seed(seed)
        directions = {}
        for block, direction in self.directions.items():
            draw = torch.randn(direction.shape, generator=generator, dtype=torch.float32)
            directions[block] = (draw / draw.norm()).to(direction.dtype)
        return ConceptVector(directions, dict(self.norms), dict(self.metadata, control=f"random-direction seed {seed}"))

    @contextmanager
    def apply(
        self, model, coefficient: float, blocks: list[int] | None = None, positions: str | None = None
    ) -> Iterator[None]:
        """Context manager: while active, block b's output gets coefficient * norms[b] * directions[b] added.

        blocks: the vector's blocks (default) or a subset of them; positions: 'all' (every prompt and generated
        position) or 'answer' (the last position of a multi-token pass and every decoding step: generate with
        `steer_utils.generate` or `model.generate`, which pass the prompt at once; `decoding.generate` runs shared
        prompt prefixes as passes of their own); default: the positions of the vector's `protocol` ('all' without
        one). Hooks are removed on exit, even on error.
        """
        if positions is None:
            protocol = self.protocol
            positions = protocol.positions if protocol else "all"
        if (
            isinstance(coefficient, bool)
            or not isinstance(coefficient, (int, float))
            or not torch.isfinite(torch.tensor(float(coefficient)))
        ):
            raise ValueError(f"coefficient must be a finite number such as 0.035, got {coefficient!r}.")
        chosen = sorted(self.directions) if blocks is None else list(blocks)
        rows = steering_additions([self], [coefficient], chosen)  # block -> (1, d); raises for a missing block
        with steer(model, {b: a[0] for b, a in rows.items()}, positions):  # (d,): the same for every row
            yield


def block_norms(hidden: torch.Tensor) -> torch.Tensor:
    """Typical hidden-state norm per block: the median over prompts and tail positions, (n_blocks,).

    hidden: (n, n_blocks, n_tail, d). The median resists the few tokens with outsized norms.
    """
    return hidden.norm(dim=-1).transpose(0, 1).reshape(hidden.shape[1], -1).median(dim=1).values


def fit_concept_vector(
    method: str,
    features: torch.Tensor,
    labels: torch.Tensor,
    is_prefixed: torch.Tensor,
    norms: torch.Tensor,
    metadata: dict[str, str] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[ConceptVector, list[dict]]:
    """Fit one vector per block. features: (n, n_blocks, d) at each block's selected token; labels: (n, n_blocks)."""
    if method == "rfm":
        raw, settings = fit_rfm(features, labels, seed=seed)
        directions = {b: orient(raw[b], features[:, b].float(), is_prefixed) for b in range(features.shape[1])}
        details = [{"block": b, **settings[b]} for b in directions]
    else:
        directions = {
            block: fit_vector(method, features[:, block], labels[:, block], is_prefixed)
            for block in tqdm(range(features.shape[1]), desc=f"fit {method}", leave=False, disable=not progress)
        }
        details = [{"block": b} for b in directions]
    norm_map = {b: float(norms[b]) for b in directions}
    return ConceptVector(directions, norm_map, dict(metadata or {}, method=method)), details


def steering_additions(
    vectors: Sequence[ConceptVector], coefficients: Sequence[float], blocks: Sequence[int] | Sequence[Sequence[int]]
) -> dict[int, torch.Tensor]:
    """Per-row additions {block: (rows, d)} = coefficient_r * norm_rl * v_rl, one row per (vector, coefficient).

    `blocks` lists the steered blocks, for all rows or (a list of lists) for each row; a row that does not
    steer a block gets zeros there.
    """
    if len(vectors) != len(coefficients):
        raise ValueError(f"Got {len(vectors)} vectors for {len(coefficients)} coefficients; give one per row.")
    if not len(coefficients):
        raise ValueError("The coefficient grid is empty; give at least one coefficient.")
    per_row = (
        [list(b) for b in blocks] if len(blocks) and not isinstance(blocks[0], int) else [list(blocks)] * len(vectors)
    )
    if len(per_row) != len(vectors):
        raise ValueError(f"Got {len(per_row)} block lists for {len(vectors)} rows; give one per row.")
    additions = {}
    for block in sorted(set().union(*per_row)):
        missing = [i for i, (v, b) in enumerate(zip(vectors, per_row)) if block in b and block not in v.directions]
        if missing:
            raise ValueError(f"Block {block} has no direction in vector(s) {missing}; choose blocks the vectors cover.")
        additions[block] = torch.stack(
            [
                c * v.norms[block] * v.directions[block].float()
                if block in b
                else torch.zeros_like(next(iter(v.directions.values())), dtype=torch.float32)
                for v, c, b in zip(vectors, coefficients, per_row)
            ]
        )
    return additions
