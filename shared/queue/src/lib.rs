//! One queue API with two backends: Amazon SQS and an embedded queue in the service's own
//! database. Under construction (issue 4).
