"""payment-gateway: payments through a provider adapter (Authorize.Net or the PSP simulator)."""
