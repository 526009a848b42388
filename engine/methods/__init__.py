"""One module per published acquisition method. Importing this package registers every
method's signals and selectors in `poolscout.engine.acquisition` (the registries do it on
their first lookup).

| module | method | registers |
|---|---|---|
| `baseline` | random | signal `random` |
| `uncertainty` | entropy, margin, least confidence | signals `entropy`, `margin`, `least_confidence` |
| `bald` | BALD (MC dropout) | signal `bald` |
| `coreset` | core-set (k-center greedy) | selector `coreset` |
| `herding` | MaxHerding / uncertainty herding (dense, or sparse on a kNN graph) | selector `maxherding` |
| `typiclust` | TypiClust (typical points of the largest uncovered k-means clusters) | selector `typiclust` |
| `probcover` | ProbCover (top-hat coverage, radius from a purity threshold) | selector `probcover` |
| `cluster_margin` | Cluster-Margin (margin pre-filter, round-robin over k-means clusters) | selector `cluster_margin` |
| `badge` | BADGE (k-means++ on factorised gradient embeddings of each image's top box) | selector `badge` |
| `cald` | CALD | signal `cald`, selector `cald_rerank` |
| `huale` | HUALE | signals `huale_*`, selector `weighted_l2` |
| `ppal` | PPAL | signal `dcus`, selector `ccms` |
| `gsal` | GSAL (diffusion difficulty x concept-graph prior; D / V arithmetic, graph, greedy) | selector `gsal` |

A new method is a new module here plus a line below.
"""
from poolscout.engine.methods import (baseline, uncertainty, bald, coreset, cald, huale, ppal, herding,  # noqa: F401
                                      typiclust, probcover, cluster_margin, badge, gsal)
