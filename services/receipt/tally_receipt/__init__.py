"""receipt: receipts and credit notes for settled purchases and refunds."""
