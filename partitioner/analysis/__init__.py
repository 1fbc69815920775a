"""Compiler stage: analysis — the system file, profiles and the cost table.

* :func:`load_system` (``analysis.system``): validated devices, links and application;
* :func:`build_cost_table` (``analysis.costs``): analytic and profiled prices of every
  bundle and transfer of the extended chain (SPEC §2-4);
* :class:`Profile`, :func:`load_profile`, :func:`save_profile` (``analysis.profiles``);
* ``analysis.profiler`` (bundle profiling with ONNX Runtime) and ``analysis.lazy`` (lazy
  profiling) are imported on demand: they pull in onnxruntime.
"""

from partitioner.analysis.costs import build_cost_table
from partitioner.analysis.profiles import Profile, ProfiledBundle, load_profile, save_profile
from partitioner.analysis.system import load_system

__all__ = ["load_system", "build_cost_table", "Profile", "ProfiledBundle", "load_profile",
           "save_profile"]
