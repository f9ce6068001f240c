"""Solvers of ``(H + λI) x = v``; each takes Hessian-vector products as a callable and knows no model."""

from .cg import solve_cg
from .exact import build_hessian, solve_exact
from .lissa import LissaDivergenceError, power_iteration, solve_lissa

__all__ = ["solve_cg", "solve_exact", "build_hessian", "solve_lissa", "power_iteration", "LissaDivergenceError"]
