"""Flower server side: the ServerApp, its one Strategy (which asks the run's method what travels and
how replies combine), the metered Grid, and the checks of a client's reply."""
