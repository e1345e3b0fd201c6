"""Tally catalog service: merchants, products and prices, operation types, subscription plans."""
