"""Reading a run's output_dir back: `dist-train report` (a page with plots) and `dist-train runs`."""
