#pragma once
/// \file
/// Every balancing loss (computed from a forward call's routing and logits, with its gradient with
/// respect to the logits; the `loss_term` contract in `loss_term.hpp`) and the auxiliary-loss-free
/// bias update (U1): one header each, all included here.

#include "moe/losses/bias_update.hpp"
#include "moe/losses/load_balance.hpp"
#include "moe/losses/loss_term.hpp"
#include "moe/losses/null_balance.hpp"
#include "moe/losses/seq_balance.hpp"
#include "moe/losses/z_loss.hpp"
