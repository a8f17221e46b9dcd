"""``effray data clean``: exact and near duplicates, leaks between splits and label issues
of a prepared dataset, found on Ray; a report always, a cleaned dataset with ``--drop``."""
