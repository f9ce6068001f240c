"""What the Space is configured by: the environment variables it reads, the limits of what a visitor may ask for, and
how its live engine computes influence (`LIVE_SETTINGS`, and what it keeps of a table's settings)."""

from __future__ import annotations

CACHE_ENV = "HF_FASTIF_SPACE_CACHE"
TABLE_ENV = "HF_FASTIF_TABLE"
REVISION_ENV = "HF_FASTIF_TABLE_REVISION"
MODEL_ENV = "HF_FASTIF_MODEL"
KIND_ENV = "HF_FASTIF_EMBEDDED_MODEL"
MAX_TEXT_CHARS = 300
MAX_PAIR_TOKENS = 256
"""Word pieces of a typed pair (with [CLS] / [SEP]); 300 characters of English are ~70 per sentence."""
MAX_ROWS = 50
MAX_CANDIDATES = 500
MAX_TRAIN_ROWS = 5000
MAX_LIVE_PARAMETERS = 20_000_000
"""Influence parameters above which live explanations are off: the low-rank Hessian holds 2 × rank vectors of them."""
MAX_GRAPH_TESTS = 6

LIVE_SETTINGS: dict = dict(
    influence_solver="arnoldi", influence_arnoldi_rank=16, influence_arnoldi_rows=1024,
    influence_knn_features="gradient", influence_projection_dim=4096, influence_knn_k=100,
    influence_scoring_batch_size=256, influence_check_convergence=False, influence_trunk_cache=True,
    influence_repetitions=1,
)
"""How the Space's engine computes influence, chosen for about half a second per typed pair on 2 CPU cores:
s_test from the top 16 eigenpairs of H (Lanczos on 1,024 seeded training rows, computed once at start-up: on the
MiniLM default ~1.4 s, and closer to the full Hessian than 256 rows, which was the larger error; a rank of 32 or 64
changed nothing), candidates from the gradient index (a 4,096-bucket count sketch of per-example gradients: far
higher recall than [CLS] kNN), and exact JVP scoring of the k candidates. The table's own influence parameters, λ
and L2 term are kept. LiSSA's T, which arnoldi does not read, is pinned at 1: the embedded table's default T (4) is
no setting of the Space's, and recorded in its build it had made every build of an earlier default refused for
reuse. docs/space.md has the measurements (``python -m benchmarks.space_latency --quality``)."""
LIVE_FROM_TABLE = ("influence_params", "influence_damping", "influence_scale", "influence_weight_decay",
                   "influence_weight_decay_in_gradients", "influence_seed", "label_smoothing_factor")
"""Settings of a table that its live explanations keep (what decides the numbers, apart from the solver)."""
CACHED = ("trunk", "low_rank", "gradient_index")
"""The engine caches a warm start needs (`InfluenceEngine.load_caches` names)."""


def live_settings(table_settings: dict, num_influence_parameters: int, k: int | None = None) -> dict:
    """The ``influence_*`` settings of the live engine: `LIVE_FROM_TABLE` from the table's settings, then
    `LIVE_SETTINGS` (the projection no larger than the number of influence parameters), then ``k``."""
    out = {key: table_settings[key] for key in LIVE_FROM_TABLE if table_settings.get(key) is not None}
    if "influence_weight_decay_in_gradients" not in table_settings and table_settings.get("influence_weight_decay"):
        out["influence_weight_decay_in_gradients"] = True  # a table from before the setting: the L2 term in every loss
    out |= LIVE_SETTINGS
    out["influence_projection_dim"] = min(LIVE_SETTINGS["influence_projection_dim"], int(num_influence_parameters))
    if k is not None:
        out["influence_knn_k"] = int(k)
    return out
