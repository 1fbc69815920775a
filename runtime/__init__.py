"""Runtime: workers that serve stages and an executor that chains them."""
