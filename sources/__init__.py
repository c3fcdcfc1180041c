"""Your own data sources, plugged in by import path: `data.dataset: sources.example:CsvSource`."""
