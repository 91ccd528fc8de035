"""Loss-curvature diagnostics: Hessian-vector products, λmax (Lanczos, power iteration), Hutchinson trace.

λmax is the largest (algebraic) eigenvalue of the Hessian, as both papers define it ("the maximum
eigenvalue"), not the one of largest magnitude: the two differ when the most negative curvature
dominates. Both methods report it, with ``converged`` true only when a residual bound shows the
tolerance met. λmin (the smallest eigenvalue) is reported beside it only when certified the same way by
its own residual (``lambda_min_converged``), else None.

Usable without Hydra: every function takes a model, a mean-reduced ``loss_fn`` and a list of
``(inputs, targets)`` batches. The Hessian is that of the mean loss over all the batches, with
respect to every trainable parameter (``requires_grad``), with the model in eval mode (BatchNorm uses
running stats, dropout off) and fused attention switched off while measuring (:func:`measuring_mode`), in
full float32 (TF32 off on a GPU).

Memory: with ``reuse_graph`` every batch's gradient graph is kept; Lanczos also keeps up to ``max_iter``
model-sized vectors. Before iterating, :class:`HessianOperator` measures the first batch's graph (the bytes
autograd saves for it) and compares graphs + vectors with the free memory of the device: when only one
batch's graph fits beside the vectors it switches to ``reuse_graph=False`` (same values, each product rebuilds
the graphs) with one warning line; when not even that fits it refuses in one line (:class:`MemoryBudgetError`).

The weight spectrum, the activation ranges and :func:`craft_runner.diagnostics.run_diagnostics`, the one
entry the pipeline calls, live in :mod:`craft_runner.diagnostics`.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from craft_runner.device import available_memory, full_fp32
from craft_runner.train import RunError

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


_PLAIN_BN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm)


def _bn_as_affine(self: torch.nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm written as x·s + t (s = γ/√(σ²+ε), t = β − μ·s): the same function, with a
    cheap double backward (the fused kernel's is a long chain of full-size elementwise ops)."""
    scale = torch.rsqrt(self.running_var + self.eps)
    shift = -self.running_mean * scale
    if self.weight is not None:
        scale = scale * self.weight
        shift = shift * self.weight
    if self.bias is not None:
        shift = shift + self.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype)


class _ConvGrads(torch.autograd.Function):
    """(gO, x, w) ↦ (∂L/∂x, ∂L/∂w) of a convolution, with a double backward made of plain convolutions.

    Convolution is bilinear in (x, w), so for cotangents (u, U) of the two outputs
    ⟨u, gx⟩ + ⟨U, gw⟩ = ⟨conv(u, w) + conv(x, U), gO⟩, whence ∂/∂gO = conv(u, w) + conv(x, U),
    ∂/∂w = the weight gradient of conv(u, ·) at gO and ∂/∂x = the input gradient of conv(·, U) at gO.
    PyTorch's own double backward computes the weight term as one huge convolution over transposed
    tensors (slow on CPU); these are the ordinary backward kernels.
    """

    @staticmethod
    def forward(ctx, g_out, x, w, conf, need_x, need_w):
        stride, padding, dilation, groups = conf
        gx, gw, _ = torch.ops.aten.convolution_backward(g_out, x, w, None, stride, padding, dilation, False,
                                                          [0] * len(stride), groups, [need_x, need_w, False])
        ctx.save_for_backward(g_out, x, w)
        ctx.conf = conf
        dummy = torch.zeros((), dtype=x.dtype, device=x.device)  # for an output nobody asked for
        return (gx if need_x else dummy), (gw if need_w else dummy)

    @staticmethod
    def backward(ctx, u, big_u):
        g_out, x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        n = len(stride)
        need_g, need_x, need_w = ctx.needs_input_grad[:3]
        u = u if u is not None and u.dim() == x.dim() else None
        big_u = big_u if big_u is not None and big_u.dim() == w.dim() else None
        d_g = d_x = d_w = None
        if need_g and (u is not None or big_u is not None):
            if u is not None:
                d_g = torch.convolution(u, w, None, stride, padding, dilation, False, [0] * n, groups)
            if big_u is not None:
                term = torch.convolution(x, big_u, None, stride, padding, dilation, False, [0] * n, groups)
                d_g = term if d_g is None else d_g.add_(term)
        if need_w and u is not None:
            d_w = torch.ops.aten.convolution_backward(g_out, u, w, None, stride, padding, dilation, False,
                                                      [0] * n, groups, [False, True, False])[1]
        if need_x and big_u is not None:
            d_x = torch.ops.aten.convolution_backward(g_out, x, big_u, None, stride, padding, dilation, False,
                                                      [0] * n, groups, [True, False, False])[0]
        return d_g, d_x, d_w, None, None, None


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, conf):
        stride, padding, dilation, groups = conf
        ctx.save_for_backward(x, w)
        ctx.conf, ctx.has_bias = conf, b is not None
        return torch.convolution(x, w, b, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def backward(ctx, g_out):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if need_x or need_w:
            gx, gw = _ConvGrads.apply(g_out, x, w, ctx.conf, need_x, need_w)
        if need_b:
            gb = g_out.sum(dim=[d for d in range(g_out.dim()) if d != 1])
        return (gx if need_x else None), (gw if need_w else None), gb, None


def _conv_for_hvp(self: torch.nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    return _Conv.apply(x, self.weight, self.bias, (list(self.stride), list(self.padding), list(self.dilation),
                                                  self.groups))


_PLAIN_CONV = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


@contextlib.contextmanager
def measuring_mode(model: torch.nn.Module) -> Iterator[None]:
    """The state in which curvature is measured; everything restored afterwards, also on error.

    Eval mode; fused attention off (it has no double backward); TF32 off (:func:`craft_runner.device.full_fp32`:
    a certificate at tol=1e-3 must not sit in TF32's rounding); and two substitutions that compute the
    same function with a much cheaper double backward, hence cheaper Hessian-vector products: plain
    BatchNorm layers as the per-channel affine map they are in eval mode, and plain convolutions with the
    double backward of :class:`_ConvGrads`.
    """
    was_training = model.training
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    bns = [m for m in model.modules()
           if type(m) in _PLAIN_BN and m.running_mean is not None and m.running_var is not None
           and "forward" not in m.__dict__]
    convs = [m for m in model.modules()
             if type(m) in _PLAIN_CONV and m.padding_mode == "zeros" and not isinstance(m.padding, str)
             and "forward" not in m.__dict__]
    model.eval()
    for m, _ in fused:
        m.fused_attn = False
    for m in bns:
        m.forward = types.MethodType(_bn_as_affine, m)
    for m in convs:
        m.forward = types.MethodType(_conv_for_hvp, m)
    try:
        with full_fp32():
            yield
    finally:
        for m in bns + convs:
            del m.forward
        for m, flag in fused:
            m.fused_attn = flag
        model.train(was_training)


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class MemoryBudgetError(RunError):
    """A curvature measurement that cannot fit in the device's free memory (one line, before iterating)."""


GiB = 2 ** 30


def graph_bytes(outputs: Sequence[torch.Tensor], exclude: Sequence[torch.Tensor] = ()) -> int:
    """The bytes that the autograd graph behind ``outputs`` keeps alive, the outputs included: every tensor its
    nodes save, each storage once, those of ``exclude`` (parameters, inputs) left out.

    Found by walking the graph's nodes and reading what each saved. (Saved-tensor hooks that hand back the
    tensor itself would see the same tensors, but tie each saved output to its own node in a reference cycle
    through autograd's C++ objects that Python's collector cannot see: the whole graph, a gigabyte or more on a
    CNN, then outlived the measurement.)"""
    known = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def count(t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without storage of its own: counted by size
            seen[id(t)] = t.numel() * t.element_size()
            return
        if st.data_ptr() not in known:
            seen[st.data_ptr()] = st.nbytes()

    for t in outputs:
        count(t)
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    visited: set = set()
    while stack:
        node = stack.pop()
        if node in visited:
            continue
        visited.add(node)
        names = [n for n in dir(node) if n.startswith("_saved_")]
        values = []
        for n in names:
            try:
                values.append(getattr(node, n))
            except RuntimeError:  # already freed
                pass
        if hasattr(node, "saved_tensors"):  # a custom autograd.Function's node: its ctx
            try:
                values.append(node.saved_tensors)
            except RuntimeError:  # already freed
                pass
        for v in values:
            for t in (v if isinstance(v, (tuple, list)) else (v,)):
                if torch.is_tensor(t):
                    count(t)
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return sum(seen.values())


class HessianOperator:
    """v ↦ H v for the mean loss over ``batches`` (a reverse-over-reverse Hessian-vector product).

    With ``reuse_graph`` the first-order gradient graph of every batch is built once and
    differentiated again for each product (fast; memory grows with the number of samples).
    Vectors are lists of tensors shaped like ``params``; :meth:`flat_matvec` takes a flat vector.

    Memory check (before any product): ``extra_bytes`` (what the caller keeps beside: Lanczos's basis) plus the
    graphs must fit in ``max_bytes`` (None: the device's free memory, :func:`craft_runner.device.available_memory`).
    The graphs are estimated from the first batch's (the bytes autograd saves for it, scaled by batch size).
    If they do not fit but one batch's graph does, ``reuse_graph`` is switched off with a warning (the attribute
    says which was used); if not even that fits, :class:`MemoryBudgetError`. ``what`` names the measurement.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, batches: Sequence[Batch],
                 reuse_graph: bool = True, max_bytes: Optional[int] = None, extra_bytes: int = 0,
                 what: str = "the Hessian"):
        self.model, self.loss_fn, self.batches = model, loss_fn, list(batches)
        self.params = trainable_params(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        if not self.batches:
            raise ValueError("no batches to measure the Hessian on")
        self.n_total = sum(len(y) for _, y in self.batches)
        self.reuse_graph = reuse_graph
        self.products = 0
        self._grads: list[tuple[torch.Tensor, ...]] | None = None
        budget = max_bytes if max_bytes is not None else available_memory(self.params[0].device)
        first, graph = self._measured_grad(self.batches[0])
        self.graph_bytes = graph  # of the first batch
        if budget is not None:
            self._fit_in(budget, graph, extra_bytes, what)
        if self.reuse_graph:
            self._grads = [first] + [self._batch_grad(b) for b in self.batches[1:]]
        del first

    def _measured_grad(self, batch: Batch) -> tuple[tuple[torch.Tensor, ...], int]:
        """The batch's gradient with its graph, and the bytes that graph holds (:func:`graph_bytes`)."""
        grads = self._batch_grad(batch)
        exclude = [*self.params, *(t for t in batch if torch.is_tensor(t))]
        return grads, graph_bytes(grads, exclude)

    def _fit_in(self, budget: int, graph: int, extra: int, what: str) -> None:
        per_sample = graph / max(len(self.batches[0][1]), 1)
        largest = max(graph, int(per_sample * max(len(y) for _, y in self.batches)))
        all_graphs = max(graph, int(per_sample * self.n_total))
        if self.reuse_graph and extra + all_graphs > budget and extra + largest <= budget:
            log.warning("%s: keeping every batch's gradient graph would need %.2f GiB (graphs %.2f GiB + vectors "
                        "%.2f GiB) of %.2f GiB free: measuring with reuse_graph=false instead (same values, slower: "
                        "each product rebuilds the graphs)", what, (extra + all_graphs) / GiB, all_graphs / GiB,
                        extra / GiB, budget / GiB)
            self.reuse_graph = False
        elif extra + largest > budget:
            raise MemoryBudgetError(
                f"{what} needs about {(extra + largest) / GiB:.2f} GiB ({extra / GiB:.2f} GiB of vectors + "
                f"{largest / GiB:.2f} GiB for one batch's gradient graph) but {budget / GiB:.2f} GiB are free: lower "
                f"sharpness.max_iter or sharpness.batch_size, or use sharpness.method=power")

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params)

    def _batch_grad(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        x, y = batch
        weight = len(y) / self.n_total
        loss = self.loss_fn(self.model(x), y) * weight
        return torch.autograd.grad(loss, self.params, create_graph=True)

    def matvec(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = [torch.zeros_like(p) for p in self.params]
        for i, batch in enumerate(self.batches):
            grads = self._grads[i] if self._grads is not None else self._batch_grad(batch)
            # d(g·v)/dw = H v: a vector-Jacobian product of the gradient with v
            hv = torch.autograd.grad(grads, self.params, grad_outputs=list(v), retain_graph=self.reuse_graph,
                                     allow_unused=True)
            for o, h in zip(out, hv):
                if h is not None:
                    o.add_(h.detach())
        self.products += 1
        return out

    def flat_matvec(self, v: torch.Tensor) -> torch.Tensor:
        return _flatten(self.matvec(_unflatten(v, self.params)))


def _flatten(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflatten(v: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(v[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _normalize(v: list[torch.Tensor]) -> list[torch.Tensor]:
    norm = torch.sqrt(_dot(v, v)).clamp_min(1e-12)
    return [x / norm for x in v]


@dataclass
class EigResult:
    value: float  # λmax, the largest (algebraic) eigenvalue
    iterations: int  # Hessian-vector products used
    rel_change: float  # |λ_k − λ_{k−1}| / |λ_k| at the last iteration
    # The tolerance was met: ‖H v − θ v‖ ≤ tol·|θ| for the reported θ and its unit vector v, so an
    # eigenvalue of H lies within tol·|θ| of θ (Weinstein's bound). Never inferred from a slow change.
    # Which eigenvalue: for Lanczos θ ≤ λmax always (a Ritz value); an iterate still stuck near a second
    # eigenvalue just below λmax can also pass the test, for either method, if λmax's direction is tiny.
    converged: bool
    method: str = "lanczos"
    # ‖H v − θ v‖ / |θ| of the reported estimate (power: the last iterate; Lanczos: the top Ritz pair).
    rel_residual: float | None = None
    # λmin, only when certified by its own residual: lambda_min_residual = ‖H v − θ v‖ / |θ| for the estimate θ
    # and its unit vector v, below the same tol as λmax's (lambda_min_converged), else None.
    # Lanczos: the smallest Ritz value (λmin approached from above: the most negative curvature seen), its
    # residual from one extra Hessian-vector product on the Ritz vector (not counted in ``iterations``).
    # Power: the dominant eigenvalue when it was negative (found on the way; its residual is the first
    # run's), else None with no residual (power iteration does not estimate λmin then).
    lambda_min: float | None = None
    lambda_min_converged: bool = False
    lambda_min_residual: float | None = None
    # Whether the graphs were kept across products (false also when switched off to fit in memory).
    reuse_graph: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)


METHODS = ("lanczos", "power")


def _power(op: HessianOperator, v: list[torch.Tensor], shift: float, max_iter: int, tol: float):
    """Power iteration on H − shift·I from ``v``, stopping on the residual bound.

    Returns (θ, v, products, rel. change, rel. residual, converged) with θ the Rayleigh quotient of H
    (shift added back), so the test ‖H v − θ v‖ ≤ tol·|θ| is on H itself.
    """
    theta, prev, rel, resid, it = 0.0, float("nan"), float("inf"), float("inf"), 0
    for it in range(1, max_iter + 1):
        hv = op.matvec(v)
        theta = float(_dot(v, hv))
        r = torch.sqrt(sum(((h - theta * x) ** 2).sum() for h, x in zip(hv, v)))
        resid = float(r) / max(abs(theta), 1e-12)
        rel = abs(theta - prev) / max(abs(theta), 1e-12) if it > 1 else float("inf")
        prev = theta
        if resid <= tol:
            break
        if shift:
            hv = [h - shift * x for h, x in zip(hv, v)]
        v = _normalize(hv)
    return theta, v, it, rel, resid, resid <= tol


def power_iteration(model: torch.nn.Module, loss_fn: Callable, batches: Sequence[Batch], max_iter: int = 100,
                    tol: float = 1e-3, seed: int = 0, reuse_graph: bool = True,
                    max_bytes: Optional[int] = None) -> EigResult:
    """λmax (largest algebraic Hessian eigenvalue) by power iteration, shifted when the dominant one is negative.

    Power iteration converges to the eigenvalue of largest magnitude λ_d. If λ_d ≥ 0 that is λmax. If
    λ_d < 0 it is λmin, and a second power iteration on H − λ_d·I (whose spectrum is λ_i − λ_d ≥ 0, so its
    dominant eigenvalue is λmax − λ_d) gives λmax. Each run stops once ‖H v − θ v‖ ≤ ``tol``·|θ| (an
    eigenvalue of H within tol·|θ| of θ), after at most ``max_iter`` products; ``converged`` says whether
    that happened for λmax (and for λ_d first when it was negative; λ_d is then λmin, reported only
    when its own run converged). With two close top eigenvalues it
    needs many products, and the test may pass on the lower one (an eigenvalue is within tol, not
    necessarily the largest): Lanczos (the default method) needs far fewer products and separates them.
    ``max_bytes``: the memory budget of :class:`HessianOperator` (None: the device's free memory).
    """
    with measuring_mode(model):
        vectors = 4 * sum(p.numel() * p.element_size() for p in trainable_params(model))  # v, H v, residual, start
        op = HessianOperator(model, loss_fn, batches, reuse_graph=reuse_graph, max_bytes=max_bytes,
                             extra_bytes=vectors, what="λmax (power iteration)")
        g = torch.Generator().manual_seed(seed)
        v0 = _normalize([torch.randn(p.shape, generator=g).to(p) for p in op.params])
        theta, v, it, rel, resid, ok = _power(op, v0, 0.0, max_iter, tol)
        lam_min = min_resid = None
        min_ok = False
        if theta < 0:
            lam_min, min_resid, min_ok = theta, resid, ok
            # start away from the λmin eigenvector, which the shifted operator maps to 0
            theta, v, it2, rel, resid, ok2 = _power(op, v0, lam_min, max_iter, tol)
            it, ok = it + it2, ok and ok2
    res = EigResult(theta, it, rel, ok, "power", rel_residual=resid, lambda_min=lam_min if min_ok else None,
                    lambda_min_converged=min_ok, lambda_min_residual=min_resid, reuse_graph=op.reuse_graph)
    log.debug("power iteration: λmax=%.4g after %d products (residual %.2g)", theta, it, resid)
    return res


def _basis_peak(m_max: int) -> int:
    """Most Lanczos vectors held at once: the basis grows 16, 32, 64, ... up to m_max rows, and growing it by
    concatenation holds the old rows and the new ones together for a moment."""
    rows = peak = min(m_max, 16)
    while rows < m_max:
        grown = rows + min(rows, m_max - rows)
        peak, rows = max(peak, rows + grown), grown
    return peak


def lanczos(model: torch.nn.Module, loss_fn: Callable, batches: Sequence[Batch], max_iter: int = 100,
            tol: float = 1e-3, seed: int = 0, reuse_graph: bool = True, max_bytes: Optional[int] = None) -> EigResult:
    """λmax and λmin of the Hessian by Lanczos with full reorthogonalisation (the default method).

    After m Hessian-vector products the m×m tridiagonal matrix T_m = Qᵀ H Q is formed and its
    eigenvalues (Ritz values) taken by ``torch.linalg.eigvalsh``; the top Ritz value θ is λmax's
    estimate, from below, and the smallest one λmin's, from above. λmin is reported only when its Ritz
    vector y passes the same test on one more product, ‖H y − θ_min y‖ < ``tol``·|θ_min|; else None,
    with ``lambda_min_converged`` false and the residual recorded. Every new Lanczos vector is
    orthogonalised against all previous ones twice ("twice is enough"), so no spurious copies appear.
    Stops when the top Ritz pair's residual ‖H y − θ y‖ = β_m |s_m| is below ``tol``·|θ| (an eigenvalue
    then lies within tol·|θ| of θ, and the error is usually far smaller), or after ``max_iter``
    products, or when the Krylov space is exhausted (β = 0: exact). Memory: one model-sized vector per
    product (the basis grows as needed, up to ``max_iter`` vectors), counted with the graphs in the memory
    check of :class:`HessianOperator` (``max_bytes``: its budget, None: the device's free memory).
    """
    with measuring_mode(model):
        params = trainable_params(model)
        n = sum(p.numel() for p in params)
        m_max = min(max_iter, n)
        elem = params[0].element_size() if params else 4
        basis_bytes = (_basis_peak(m_max) + 4) * n * elem  # the basis at its largest and 4 working vectors
        op = HessianOperator(model, loss_fn, batches, reuse_graph=reuse_graph, max_bytes=max_bytes,
                             extra_bytes=basis_bytes, what=f"λmax (Lanczos, up to {m_max} basis vectors)")
        like = op.params[0]
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(n, generator=g, dtype=torch.float64).to(device=like.device, dtype=like.dtype)
        q /= torch.linalg.vector_norm(q)
        Q = torch.zeros(min(m_max, 16), n, dtype=like.dtype, device=like.device)
        alphas: list[float] = []
        betas: list[float] = []
        theta, prev, rel, resid, lam_min, it, b = 0.0, float("nan"), float("inf"), float("inf"), 0.0, 0, 0.0
        for it in range(1, m_max + 1):
            if it > len(Q):  # grow the basis geometrically, not up front
                Q = torch.cat([Q, torch.zeros(min(len(Q), m_max - len(Q)), n, dtype=Q.dtype, device=Q.device)])
            Q[it - 1] = q
            w = op.flat_matvec(q)
            a = float(torch.dot(w.double(), q.double()))
            alphas.append(a)
            basis = Q[:it]
            for _ in range(2):  # full reorthogonalisation, twice
                w = w - basis.T @ (basis @ w)
            b = float(torch.linalg.vector_norm(w.double()))
            T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
            if it > 1:
                off = torch.tensor(betas, dtype=torch.float64)
                T = T + torch.diag(off, 1) + torch.diag(off, -1)
            evals, evecs = torch.linalg.eigh(T)
            theta, lam_min = float(evals[-1]), float(evals[0])
            resid = b * abs(float(evecs[-1, -1])) / max(abs(theta), 1e-12)
            rel = abs(theta - prev) / max(abs(theta), 1e-12) if it > 1 else float("inf")
            prev = theta
            if resid < tol or b <= 1e-10 * max(abs(theta), 1.0):
                break
            betas.append(b)
            q = w / b
        # λmin's own certificate: the residual of the bottom Ritz pair, from one more product
        y = Q[:it].T @ evecs[:, 0].to(Q.dtype)
        y = y / torch.linalg.vector_norm(y).clamp_min(1e-30)
        r = op.flat_matvec(y).double() - lam_min * y.double()
        min_resid = float(torch.linalg.vector_norm(r)) / max(abs(lam_min), 1e-12)
    converged = resid < tol or b <= 1e-10 * max(abs(theta), 1.0)
    min_ok = min_resid < tol
    res = EigResult(theta, it, rel, converged, "lanczos", rel_residual=resid, lambda_min=lam_min if min_ok else None,
                    lambda_min_converged=min_ok, lambda_min_residual=min_resid, reuse_graph=op.reuse_graph)
    log.debug("lanczos: λmax=%.4g λmin=%.4g (residual %.2g) after %d products (residual %.2g)", theta, lam_min,
              min_resid, it, resid)
    return res


def top_eigenvalue(model: torch.nn.Module, loss_fn: Callable, batches: Sequence[Batch], max_iter: int = 100,
                   tol: float = 1e-3, method: str = "lanczos") -> float:
    """λmax: the largest (algebraic) eigenvalue of the Hessian of the mean loss over ``batches``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    fn = {"power": power_iteration, "lanczos": lanczos}[method]
    return fn(model, loss_fn, batches, max_iter=max_iter, tol=tol).value


@dataclass
class TraceResult:
    value: float
    stderr: float  # standard error of the mean over probes
    probes: int

    def to_dict(self) -> dict:
        return asdict(self)


def hutchinson_trace(model: torch.nn.Module, loss_fn: Callable, batches: Sequence[Batch], probes: int = 100,
                     seed: int = 0, reuse_graph: bool = True, max_bytes: Optional[int] = None) -> TraceResult:
    """tr(H) ≈ mean over Rademacher probes z (entries ±1, seeded) of zᵀ H z (Hutchinson 1989)."""
    with measuring_mode(model):
        vectors = 2 * sum(p.numel() * p.element_size() for p in trainable_params(model))
        op = HessianOperator(model, loss_fn, batches, reuse_graph=reuse_graph, max_bytes=max_bytes,
                             extra_bytes=vectors, what="the Hessian trace")
        g = torch.Generator().manual_seed(seed)
        vals = []
        for _ in range(probes):
            z = [(torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p) for p in op.params]
            vals.append(float(_dot(z, op.matvec(z))))
    t = torch.tensor(vals, dtype=torch.float64)
    stderr = float(t.std() / len(vals) ** 0.5) if len(vals) > 1 else float("inf")
    return TraceResult(float(t.mean()), stderr, probes)
