"""Solvers of ``(H + λI) x = v``; each takes Hessian-vector products as a callable and knows no model."""

from .arnoldi import LowRankSolve, lanczos_steps, low_rank_hessian, solve_low_rank
from .cg import default_tolerance, solve_cg
from .exact import build_hessian, solve_decomposed, solve_exact
from .lanczos import extreme_eigenvalues, lanczos
from .lissa import (
    SPREAD_WARNING,
    TRUNCATION_WARNING,
    Carry,
    CarryCoefficient,
    GrowthMonitor,
    LissaDivergenceError,
    LissaNonFiniteError,
    converging_depth,
    repetition_spread,
    solve_lissa,
    suggest_scale,
    truncation_share,
)

__all__ = ["solve_cg", "default_tolerance", "solve_exact", "solve_decomposed", "build_hessian", "solve_lissa",
           "LissaDivergenceError", "LissaNonFiniteError", "GrowthMonitor", "suggest_scale", "lanczos", "extreme_eigenvalues",
           "lanczos_steps", "low_rank_hessian", "solve_low_rank", "LowRankSolve", "truncation_share", "TRUNCATION_WARNING",
           "converging_depth", "Carry", "CarryCoefficient", "repetition_spread", "SPREAD_WARNING"]
