"""Starting Flower on this machine, with no ML: the run config resolved and checked
(``run_config``), the simulation's CPU/GPU shares (``resources``), one process tracker and
its watchdog (``processes``, ``watchdog``), one SuperLink/SuperNode process class
(``superlink``), ``reefl run`` (``simulation``), ``reefl deploy`` (``deployment``) and
``reefl compare``'s runs (``comparison``)."""
