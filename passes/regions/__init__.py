"""The region analysis behind :mod:`repcompiler.passes.find_regions`, one concept per
module:

* :mod:`.region` - the :class:`~.region.Region` record and region/node naming;
* :mod:`.lowering` - node kinds, constants, channel/dim inference and lowering of
  nodes into the kernel algebra through the rule registry;
* :mod:`.dominance` - single-entry single-exit candidates from networkx dominators;
* :mod:`.expression` - a candidate's algebra expression and exactness reasons;
* :mod:`.selection` - which candidate is folded (cost, conv chains, sub-regions).

Callers use :func:`repcompiler.passes.find_regions.find_regions` and its ``Region``.
"""
