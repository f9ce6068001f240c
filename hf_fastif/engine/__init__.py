"""`InfluenceEngine`: the influence pipeline, and the owner of what it reuses across calls.

One call reads as its stages::

    parameters → trunk states → test gradients → s_test → candidates → scores → InfluenceTable

An engine is bound to one model, one set of ``influence_*`` settings, a data collator, and the loss / measurement /
feature functions. Its caches live exactly as long as the engine and are keyed on content, never on ``id()``; data
by the hash of the values of the columns read (`Batcher.fingerprint`, once per dataset and call), never by datasets'
``_fingerprint``, which datasets with other rows can share (a ``map`` that draws at random, run twice):

| cache | keyed on |
|---|---|
| trunk states (per dataset) | fingerprint of the weights below the split, the dataset, the collator |
| kNN feature index | fingerprint of all weights, the candidate data, the collator, the feature method, the index type |
| gradient index | all weights, the candidate data, the collator, the loss, the projection, the parameters |
| curvature estimates (LiSSA check, low-rank Hessian) | all weights, the training data, the collator, the loss, B, seed |
| the read-position cut (where the last layer is cut, or why not) | all weights, the parameters, the split, the training and test data, the setting |

`InfluenceTrainer` holds one engine across calls (training changes the weights, so the caches rebuild themselves);
`compute_influences` makes a short-lived one.

One module per stage, each a base class of `InfluenceEngine` holding that stage's methods (the state they read is
the engine's, made in `InfluenceEngine.__init__`):

| module | what |
|---|---|
| `core` | `InfluenceEngine`: its state, a call's pipeline, stage 0 (checks, parameters, batchers), scores, metadata |
| `padding` | stage 0: whether a row's numbers change with its padding; trailing padding dropped where they do not |
| `trunk_states` | stage 1: the frozen trunk's split, its states per row, the last layer's read-position cut |
| `s_test` | stages 2-3: test gradients, s_test by each solver, LiSSA's convergence check and stacked steps |
| `kept_graphs` | first-backward graphs and collated batches kept between products, within budgets (s_test's) |
| `candidates` | stage 4: kNN / gradient-index / random candidates, and their recall against the full scan |
| `saved_caches` | `save_caches` / `load_caches`: the caches on disk, keyed as in memory; under a launch, those all hold |
| `call` | `Call`: the state of one call, which every stage reads |

A module-level name is read where it is imported: a test patches it on the stage module that reads it
(``monkeypatch.setattr(hf_fastif.engine.s_test, "CHECK_ROWS", 3)``). This package exports only `InfluenceEngine`,
`loss_key` and `non_finite_scores`, so a patch of another name on the package fails instead of changing nothing.
The other stages read the padding probes' constants as ``padding.PADDING_PROBE_ROWS``: one patch reaches them all.

A new cache: made in `InfluenceEngine.__init__` (under its stage's comment), keyed on content as the table above
says, dropped in `InfluenceEngine.clear`, written and read in saved_caches.py if it should outlive the process, and
named in `SavedCaches._align_caches` if processes build it together (collectives).
"""

from .core import InfluenceEngine, loss_key, non_finite_scores

__all__ = ["InfluenceEngine", "loss_key", "non_finite_scores"]
