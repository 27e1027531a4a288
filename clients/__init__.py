"""Flower client side: the ClientApp, thin over `fedlora`."""
