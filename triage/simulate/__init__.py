"""Queue simulator: a discrete-event model of a reading service, FIFO vs the triage policy.

``triage simulate`` (see docs/simulation.md) draws a day of studies from a
:class:`~triage.simulate.config.SimulationConfig`, reads them with FIFO and with the real
worklist policy on identical arrivals, AI results and read times, and reports waits and
deadline misses.
"""

from triage.simulate.config import SimulationConfig, load_config
from triage.simulate.model import Experiment, run_day, run_experiment

__all__ = ["Experiment", "SimulationConfig", "load_config", "run_day", "run_experiment"]
