"""The simulated farm: the farm's own job book, worker book and dispatch policy over a cost model.

- `costs`: per-tier stage costs (assumed until calibrated from ledgers), ranks, `calibrate`.
- `cluster`: GPU counts per tier from a cluster file.
- `engine`: the discrete-event simulation and the lower bound no schedule can beat.
- `report`: `farm plan --simulate`'s text.
- `worker`: `SimWorker`, a worker that sleeps its cost instead of rendering (bench/scheduler.py).
"""
