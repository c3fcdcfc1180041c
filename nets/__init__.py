"""Your own networks, plugged in by import path: `model.name: nets.example:TinyNet`."""
