"""Wire dialects of the simulator server: Binance and Bybit."""
