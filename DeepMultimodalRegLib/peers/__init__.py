"""Classical registrations a user would otherwise pick, run on identical inputs for comparison."""
