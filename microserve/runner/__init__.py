"""Model runners: the torch runner computes, the sim runner waits for a modelled time."""
