"""The seeds' theory as experiments: gradient flow, degradation, identity mappings, the ODE view.

One module per experiment, each with library functions and a ``run(out_dir, ...)`` that writes
JSON (every number) and PNG figures and returns a printable table:

- :mod:`~reslab.analysis.gradflow` - gradient norms per unit and weight layer, depth sweeps
- :mod:`~reslab.analysis.degradation` - plain vs residual twins, He et al. 2015 Fig. 6
- :mod:`~reslab.analysis.responses` - std of branch responses, He et al. 2015 Fig. 7
- :mod:`~reslab.analysis.lesion` - deleting single units, Veit et al. 2016
- :mod:`~reslab.analysis.ode` - tau = T/L as forward Euler; learnable tau
- :mod:`~reslab.analysis.orderings` - the five unit orderings, He et al. 2016 Table 2
- :mod:`~reslab.analysis.shortcuts` - scaled, gated, 1x1 and dropout shortcuts, He et al. 2016
  Table 1
- :mod:`~reslab.analysis.toy` - seed 000's one-node example, autograd vs product formula
"""

from reslab.analysis.gradflow import GradientProfile, gradient_profile
from reslab.analysis.hooks import GradientRecorder, find_blocks, find_weight_layers

EXPERIMENTS = (
    "gradflow",
    "degradation",
    "responses",
    "lesion",
    "ode",
    "orderings",
    "shortcuts",
    "toy",
)

__all__ = [
    "EXPERIMENTS",
    "GradientProfile",
    "GradientRecorder",
    "find_blocks",
    "find_weight_layers",
    "gradient_profile",
]
