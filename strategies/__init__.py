"""fedlora server side: aggregation math, Flower strategies and the ServerApp."""
