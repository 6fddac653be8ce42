"""Orthonormal basis functions of the relative distance, for an additive attention bias.

The bias of head h between query i and key j <= i is ``sum_k c[h, k] * phi_k(u)``, with
``u = (i - j) / (seq_len - 1)`` in [0, 1] mapped onto each basis's own domain, and learned
coefficients ``c``. Each basis below is orthonormal on its domain (with the weight named in
``DOMAINS``); ``gram`` integrates the products numerically so a test can check it.

The polynomial families use their three-term recurrences on the orthonormal functions
themselves (no factorials, no large intermediate values); the Fourier family uses the angle
recurrence; Bessel uses torch's J0/J1 and Newton-refined zeros. RBF and Morlet wavelet families
are not orthogonal by nature: they are orthonormalised by the Cholesky factor of their Gram
matrix (computed once by quadrature), which makes them orthonormal by construction.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

BASES = ("fourier", "chebyshev", "legendre", "hermite", "laguerre", "wavelet", "sinc", "rbf", "bessel")

# basis -> (domain low, domain high, weight function name): the inner product the basis is
# orthonormal under. Infinite domains are truncated where the functions have decayed.
DOMAINS = {
    "fourier": (0.0, 1.0, "1"),
    "chebyshev": (-1.0, 1.0, "1/sqrt(1-x^2)"),
    "legendre": (-1.0, 1.0, "1"),
    "hermite": (-math.inf, math.inf, "1"),
    "laguerre": (0.0, math.inf, "1"),
    "wavelet": (0.0, 1.0, "1"),
    "sinc": (-math.inf, math.inf, "1"),
    "rbf": (0.0, 1.0, "1"),
    "bessel": (0.0, 1.0, "x"),
}


def to_domain(name: str, u: torch.Tensor, k: int) -> torch.Tensor:
    """Map u in [0, 1] (relative distance / (seq_len - 1)) onto the part of the basis's domain
    where its first k functions vary."""
    if name in ("chebyshev", "legendre"):
        return 2 * u - 1
    if name == "hermite":  # Hermite functions oscillate within |x| < sqrt(2k + 1)
        return u * math.sqrt(2 * k + 1)
    if name == "laguerre":  # Laguerre functions oscillate within x < 4k
        return u * 4 * k
    if name == "sinc":  # centres at 0, 1, ..., k-1
        return u * (k - 1)
    if name == "fourier":
        return u * (1 - 1e-9)  # [0, 1): periodic, so u = 1 would equal u = 0
    return u


def evaluate(name: str, k: int, x: torch.Tensor) -> torch.Tensor:
    """The first k functions of the basis at points x of its domain: shape (k, len(x)), float64."""
    x = x.to(torch.float64)
    out = torch.empty(k, x.numel(), dtype=torch.float64, device=x.device)
    if name == "legendre":  # orthonormal P_n: sqrt((2n+1)/2) P_n
        p_prev, p = torch.ones_like(x), x.clone()
        out[0] = p_prev * math.sqrt(0.5)
        for n in range(1, k):
            out[n] = p * math.sqrt((2 * n + 1) / 2)
            p_prev, p = p, ((2 * n + 1) * x * p - n * p_prev) / (n + 1)
    elif name == "chebyshev":  # T_n, orthonormal under 1/sqrt(1-x^2): T_0/sqrt(pi), T_n sqrt(2/pi)
        t_prev, t = torch.ones_like(x), x.clone()
        out[0] = t_prev / math.sqrt(math.pi)
        for n in range(1, k):
            out[n] = t * math.sqrt(2 / math.pi)
            t_prev, t = t, 2 * x * t - t_prev
    elif name == "hermite":  # Hermite functions, recurrence on the normalised functions
        psi_prev = math.pi**-0.25 * torch.exp(-x * x / 2)
        out[0] = psi_prev
        if k > 1:
            psi = math.sqrt(2) * x * psi_prev
            for n in range(1, k):
                out[n] = psi
                psi_prev, psi = psi, math.sqrt(2 / (n + 1)) * x * psi - math.sqrt(n / (n + 1)) * psi_prev
    elif name == "laguerre":  # Laguerre functions L_n(x) exp(-x/2)
        decay = torch.exp(-x / 2)
        l_prev, l_cur = torch.ones_like(x), 1 - x
        out[0] = l_prev * decay
        for n in range(1, k):
            out[n] = l_cur * decay
            l_prev, l_cur = l_cur, ((2 * n + 1 - x) * l_cur - n * l_prev) / (n + 1)
    elif name == "fourier":  # 1, sqrt2 cos(2 pi m x), sqrt2 sin(2 pi m x) by the angle recurrence
        theta = 2 * math.pi * x
        c1, s1 = torch.cos(theta), torch.sin(theta)
        c, s = torch.ones_like(x), torch.zeros_like(x)
        out[0] = 1.0
        for n in range(1, k):
            if n % 2 == 1:
                c, s = c * c1 - s * s1, s * c1 + c * s1  # angle m = (n + 1) // 2
                out[n] = math.sqrt(2) * c
            else:
                out[n] = math.sqrt(2) * s
    elif name == "sinc":  # shifted normalised sincs, orthonormal on the real line
        for n in range(k):
            out[n] = torch.sinc(x - n)
    elif name == "bessel":  # Fourier-Bessel: sqrt2 J0(a_n x) / |J1(a_n)|, weight x on [0, 1]
        for n, a in enumerate(bessel_j0_zeros(k)):
            out[n] = (
                math.sqrt(2)
                * torch.special.bessel_j0(a * x)
                / abs(float(torch.special.bessel_j1(torch.tensor(a, dtype=torch.float64))))
            )
    elif name in ("rbf", "wavelet"):
        raw = _raw_family(name, k, x)
        out[:] = torch.linalg.solve_triangular(_cholesky(name, k).to(x.device), raw, upper=False)
    else:
        raise ValueError(f"unknown basis {name!r}; one of {', '.join(BASES)}")
    return out


def _raw_family(name: str, k: int, x: torch.Tensor) -> torch.Tensor:
    """Gaussian bumps, or real Morlet wavelets (cos(5t) exp(-t^2/2)), spread over [0, 1]."""
    centres = torch.linspace(0, 1, k, dtype=torch.float64, device=x.device)[:, None]
    width = 1.0 / max(k - 1, 1)
    t = (x[None, :] - centres) / width
    if name == "rbf":
        return torch.exp(-t * t / 2)
    return torch.cos(5 * t / 2) * torch.exp(-t * t / 2)  # Morlet at half its usual frequency: overlapping


@lru_cache(maxsize=None)
def _cholesky(name: str, k: int) -> torch.Tensor:
    """Lower Cholesky factor of the family's Gram matrix on [0, 1] (Gauss-Legendre quadrature)."""
    x, w = gauss_legendre(max(256, 16 * k), 0.0, 1.0)
    raw = _raw_family(name, k, x)
    gram_matrix = (raw * w) @ raw.T
    return torch.linalg.cholesky(gram_matrix)


@lru_cache(maxsize=None)
def bessel_j0_zeros(k: int) -> tuple[float, ...]:
    """The first k positive zeros of J0: McMahon's asymptotic guess, refined by Newton (J0' = -J1)."""
    zeros = []
    for n in range(1, k + 1):
        beta = (n - 0.25) * math.pi
        z = torch.tensor(beta + 1 / (8 * beta) - 124 / (3 * (8 * beta) ** 3), dtype=torch.float64)
        for _ in range(20):
            z = z + torch.special.bessel_j0(z) / torch.special.bessel_j1(z)
        zeros.append(float(z))
    return tuple(zeros)


def gauss_legendre(n: int, a: float, b: float, pieces: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of n-point Gauss-Legendre quadrature (Golub-Welsch) on each of ``pieces``
    equal parts of [a, b]. Many small rules instead of one large one: the eigendecomposition
    costs n^3 (a 4000-point rule took 17 s on one core)."""
    i = torch.arange(1, n, dtype=torch.float64)
    off = i / torch.sqrt(4 * i * i - 1)
    nodes, vecs = torch.linalg.eigh(torch.diag(off, 1) + torch.diag(off, -1))
    weights = 2 * vecs[0] ** 2
    half = (b - a) / (2 * pieces)
    centres = a + half * (2 * torch.arange(pieces, dtype=torch.float64) + 1)
    return (centres[:, None] + half * nodes).flatten(), (half * weights).repeat(pieces)


def gram(name: str, k: int, pieces: int = 64) -> torch.Tensor:
    """The k x k matrix of integrals of phi_i phi_j (times the basis's weight) over its domain,
    by quadrature (64 points on each of ``pieces`` parts): the identity for an orthonormal basis."""
    if name == "chebyshev":  # Gauss-Chebyshev: exact for the 1/sqrt(1-x^2) weight
        points = 64 * pieces
        j = torch.arange(1, points + 1, dtype=torch.float64)
        x = torch.cos((2 * j - 1) * math.pi / (2 * points))
        w = torch.full_like(x, math.pi / points)
    elif name == "hermite":
        reach = math.sqrt(2 * k + 1) + 12
        x, w = gauss_legendre(64, -reach, reach, pieces)
    elif name == "laguerre":
        x, w = gauss_legendre(64, 0.0, 4 * k + 80, pieces)
    elif name == "sinc":  # slow 1/x^2 tails: a long interval, a piece per unit
        x, w = gauss_legendre(64, -2000.0, 2000.0 + k, 4000 + k)
    elif name == "legendre":
        x, w = gauss_legendre(64, -1.0, 1.0, pieces)
    else:  # fourier, wavelet, rbf, bessel on [0, 1]
        x, w = gauss_legendre(64, 0.0, 1.0, pieces)
        if name == "bessel":
            w = w * x
    phi = evaluate(name, k, x)
    return (phi * w) @ phi.T


class RelativeBias(torch.nn.Module):
    """Per-head additive attention bias from a basis of the relative distance, with causal
    masking folded in: a float mask for scaled_dot_product_attention."""

    @staticmethod
    def parameter_count(n_heads: int, num_basis: int) -> int:
        """The learned coefficients, one per head and basis function."""
        return n_heads * num_basis

    def __init__(self, n_heads: int, basis: str, num_basis: int, seq_len: int):
        super().__init__()
        if basis not in BASES:
            raise ValueError(f"unknown basis {basis!r}")
        self.basis, self.num_basis, self.seq_len = basis, num_basis, seq_len
        # Zero: training starts with no positional preference and learns one.
        self.coefficients = torch.nn.Parameter(torch.zeros(n_heads, num_basis))
        # phi_k at every relative distance 0..seq_len-1, (num_basis, seq_len) in float32 whatever
        # the module's dtype: made here (on the CPU, in float64) and moved with the module
        # (_apply), not in forward, where torch.compile compiled the model again at the second
        # call (its guard on the empty cache failed).
        with torch.device("cpu"):
            u = torch.arange(self.seq_len, dtype=torch.float64) / max(self.seq_len - 1, 1)
            self._table = evaluate(basis, num_basis, to_domain(basis, u, num_basis)).float()

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .bfloat16(): the table follows the device only
        super()._apply(fn, recurse)
        self._table = self._table.to(self.coefficients.device)
        return self

    def table(self, device: torch.device) -> torch.Tensor:
        """phi_k at every relative distance, on ``device``."""
        if self._table.device != device:  # parameters moved one by one, past _apply
            self._table = self._table.to(device)
        return self._table

    def forward(self, q_start: int, q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Bias (1, heads, q_len, k_len) for queries at positions q_start.. and keys 0..k_len-1."""
        per_distance = self.coefficients.float() @ self.table(device)  # (heads, seq_len)
        qpos = torch.arange(q_start, q_start + q_len, device=device)[:, None]
        kpos = torch.arange(k_len, device=device)[None, :]
        distance = qpos - kpos
        bias = per_distance[:, distance.clamp(min=0)]  # (heads, q_len, k_len)
        bias = bias.masked_fill(distance < 0, float("-inf"))
        return bias.unsqueeze(0).to(dtype)
