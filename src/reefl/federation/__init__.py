"""The federation on Flower: tiers, aggregation, strategy, ServerApp and ClientApp."""
