"""Methods: the teacher, the experts, MKDT's distillation (kd_steps, unroll, distill, selection), the baselines
(krr_st, mtt_ssl) and the variance study.

Imports the ground and sslkd.data: docs/architecture.md."""
