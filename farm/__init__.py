"""farm: a Ray-distributed render farm for AI video.

The core (this package) imports without a running Ray: manifest, presets, plan, models,
encode, store. Ray glue lives in `actors/` and `deployments/`.
"""

__version__ = "0.1.0"
