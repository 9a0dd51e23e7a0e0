"""What is measured on trained models: representation metrics, evaluation, plots, comparisons."""
