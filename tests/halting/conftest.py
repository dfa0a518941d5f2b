"""Halting tests run single-threaded: the models are tiny, and thread start-up and contention
cost more than they save (the CI machine is shared)."""


