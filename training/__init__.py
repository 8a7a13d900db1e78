"""Meta-training helpers used by train.py: the SI route fitted on cached summaries
(:mod:`training.si_route`) and route weights chosen out of domain (:mod:`training.held_out_folds`)."""
