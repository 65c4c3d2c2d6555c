"""``repcompiler.passes``: the graph passes of the compiler, one per module.

Every pass is a :class:`~repcompiler.passes.base.GraphPass` run by the one pass
manager (:func:`~repcompiler.passes.base.run_passes`, built on
``torch.fx.passes.infra``); passes share one typed
:class:`~repcompiler.passes.state.PipelineState` (see :mod:`.base` for the contract
and :mod:`.state` for the records).

==========================  ==============================================================
pass                        what it does
==========================  ==============================================================
``FindRegions``             analysis: linear single-entry single-exit regions and their
                            kernel-algebra expressions (:mod:`.find_regions`, steps in
                            :mod:`.regions`) -> ``state.regions``
``SqueezeRegions``          fold + verify each foldable region into one conv and rewrite
                            the graph (or leave ``state.plans``), report (:mod:`.squeeze`)
``BnToScale``               OREPA linearization: branch BNs of ``state.selected`` ->
                            learnable scales (:mod:`.bn_to_scale`) -> ``state.scaled``
``InsertPostBN``            one BN after each linearized region's sum
                            (:mod:`.insert_post_bn`) -> ``state.post_bns``
``PushBias``                a conv's bias into the eval BNs its output reaches
                            (:mod:`.push_bias`) -> ``state.pushed_biases``
``RewriteOwners``           apply ``state.plans`` to the user's modules: module-only regions
                            swapped in place, others squeezed into their owner's re-traced
                            graph and installed as its ``forward`` (:mod:`.rewrite_owners`)
                            -> ``state.rewrites``; ``fold`` and ``linearize`` both end in it
``Cleanup``                 drop identity calls and dead constants (:mod:`.cleanup`)
``FoldLinearBN``            Linear/BatchNorm1d pairs on ``(N, C)`` features (no 0-d convs in
                            the algebra): ``fold`` runs it on each traced unit first
                            (:mod:`.fold_linear_bn`) -> ``state.linear_bn_folds``
==========================  ==============================================================

:func:`~repcompiler.passes.squeeze.fold_passes` is ``FindRegions -> SqueezeRegions ->
Cleanup`` with :func:`repcompiler.fold`'s options (rules, shared modules,
``merge_convs``, ``verify``, a name prefix, a report sink).

Writing a pass: subclass ``GraphPass``, implement ``call`` (return
``PassResult(gm, modified)``, honestly), and state its contract::

    import logging
    from repcompiler.passes.base import GraphPass, PassResult, run_passes
    from repcompiler.passes.find_regions import FindRegions
    from repcompiler.passes.state import pipeline_state

    class CountFoldable(GraphPass):
        '''Log how many regions would fold (reads state.regions, edits nothing).'''

        runs_after = (FindRegions,)          # a schedule putting it earlier is refused

        def requires(self, gm):
            if pipeline_state(gm).regions is None:
                self.fail("run FindRegions first")   # raises PassContractError

        def call(self, gm):
            n = sum(r.foldable for r in pipeline_state(gm).regions)
            log.info("%d foldable regions", n)
            return PassResult(gm, False)

    log = logging.getLogger(__name__)
    gm, modified = run_passes(traced, [FindRegions(), CountFoldable()])

Modules of this package import each other and :mod:`repcompiler`'s stage modules below
the transforms (algebra, rules, errors, report, analysis, capture, the rewrite engine,
the blocks' option names), never ``repcompiler.transforms``, so
``import repcompiler.passes.<module>`` works in a fresh interpreter and
``import repcompiler`` has no cycle through here.
"""

__all__: list[str] = []
