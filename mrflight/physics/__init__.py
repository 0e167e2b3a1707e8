"""Framework-free MRF physics: pulse trains, EPG simulation, noise and the Cramér–Rao bound.

Only torch and numpy are imported here; Lightning and Hydra stay outside this package.
"""

from .crb import crb
from .epg import DEFAULT_TOL, EPG_VERSION, simulate, states_needed
from .jacobian import simulate_jacobian
from .noise import add_noise, normalize
from .sequence import Sequence, jiang2015, oksuz2019

__all__ = [
    "Sequence", "oksuz2019", "jiang2015",
    "simulate", "simulate_jacobian", "states_needed", "EPG_VERSION", "DEFAULT_TOL",
    "normalize", "add_noise", "crb",
]
