"""farm: a Ray-distributed render farm for AI video.

The core (this package, minus `farm.gpu` and the entry points `farm.cli` and `farm.driver`) imports
neither Ray nor torch: manifest, plan, presets, the job book, schedule, store, cache, simulator.
torch lives in `farm.gpu`; Ray glue in `actors/` and `deployments/`. docs/architecture.md has the map.
"""

__version__ = "0.1.0"
