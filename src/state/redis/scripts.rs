//! The Lua scripts of the `redis` state backend (see `super` for what they keep). Each runs
//! atomically in Redis; the decision scripts are prefixed with `COMMON`.

/// Shared by the scripts: `gcra(key, per_second, burst, now_us)` takes one cell and returns 0,
/// or returns the whole microseconds until one is free (taking nothing); `now_us()` is Redis's
/// clock; `guard()` says whether the epoch moved or the generation fell; `is_disabled(name)`
/// reads the kill switch.
pub(super) const COMMON: &str = r"
local function gcra(key, per_second, burst, now)
  per_second = tonumber(per_second)
  burst = tonumber(burst)
  if per_second <= 0 then return 0 end
  local interval = 1000000 / per_second
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local wait = tat - now - interval * (burst - 1)
  if wait > 0 then return math.max(1, math.ceil(wait)) end
  local next_tat = tat + interval
  redis.call('SET', key, string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
  return 0
end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- An expiry second computed on a replica's clock, never less than an hour
-- (KEEP_PAST_EXP_SECS) past Redis's own: with Redis's clock far ahead, an EXAT in its past
-- would delete a use counter at every use (max_uses unlimited) or a revocation at once.
local function keep_until(second)
  return math.max(tonumber(second), tonumber(redis.call('TIME')[1]) + 3600)
end
-- For scripts taking ARGV[1] = the epoch this replica is in and ARGV[2] = the highest
-- generation it saw: 'epoch' if the epoch moved, 'rollback' if Redis went back to older data.
local function guard()
  if redis.call('GET', 'credbroker:epoch') ~= ARGV[1] then return 'epoch' end
  if tonumber(redis.call('GET', 'credbroker:generation') or 0) < tonumber(ARGV[2]) then
    return 'rollback'
  end
end
local function is_disabled(name)
  local v = redis.call('HGET', 'credbroker:switches', name)
  return v and string.sub(v, 1, 1) == '1'
end
";

/// Checks 2 to 5 of one proxy call, in DESIGN §4.3's order. Returns `{verdict, wait_us,
/// generation}`. KEYS: epoch, revoked jti, revoked clients, revoked-before, uses counter,
/// client rate, connector rate, generation. ARGV: epoch, client, iat, connector ('' when
/// unknown or not asked), '1' when the call passed checks 2–3 locally, max_uses (0: none),
/// unix second the counter may go, client per_second/burst, connector per_second/burst (0: no
/// limit), the highest generation this replica has seen.
pub(super) const ADMIT: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {'epoch', 0, 0} end
local gen = tonumber(redis.call('GET', KEYS[8]) or 0)
if gen < tonumber(ARGV[12]) then return {'rollback', 0, gen} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'revoked', 0, gen} end
local iat = tonumber(ARGV[3])
local cut = redis.call('HGET', KEYS[3], ARGV[2])
if cut and iat <= tonumber(cut) then return {'revoked', 0, gen} end
local before = redis.call('GET', KEYS[4])
if before and iat <= tonumber(before) then return {'revoked', 0, gen} end
if ARGV[4] ~= '' and is_disabled(ARGV[4]) then return {'disabled', 0, gen} end
if ARGV[5] ~= '1' then return {'not_authorized', 0, gen} end
local max = tonumber(ARGV[6])
if max > 0 then
  local used = redis.call('INCR', KEYS[5])
  if used == 1 then redis.call('EXPIREAT', KEYS[5], keep_until(ARGV[7])) end
  gen = redis.call('INCR', KEYS[8])
  if used > max then return {'uses_spent', 0, gen} end
end
local now = now_us()
local wait = gcra(KEYS[6], ARGV[8], ARGV[9], now)
if wait > 0 then return {'client_limited', wait, gen} end
wait = gcra(KEYS[7], ARGV[10], ARGV[11], now)
if wait > 0 then return {'connector_limited', wait, gen} end
return {'ok', 0, gen}
";

/// What the token endpoint needs: `{verdict, wait_us, cut-off, disabled…}`, the cut-off being
/// the latest second up to which this client's tokens are refused (its revocation, or a lost
/// state's). KEYS: the client's issue-rate key. ARGV: epoch, generation seen, per_second,
/// burst (0: no limit), client.
pub(super) const ISSUE: &str = r"
local g = guard()
if g then return {g, 0, 0} end
local cut = tonumber(redis.call('HGET', 'credbroker:revoked:clients', ARGV[5]) or 0)
cut = math.max(cut, tonumber(redis.call('GET', 'credbroker:revoked:before') or 0))
local out = {'ok', gcra(KEYS[1], ARGV[3], ARGV[4], now_us()), cut}
local switches = redis.call('HGETALL', 'credbroker:switches')
for i = 1, #switches, 2 do
  if string.sub(switches[i + 1], 1, 1) == '1' then table.insert(out, switches[i]) end
end
return out
";

/// Adopts the epoch in force, or starts one (`<id>:<cut-off second>`): when there is none,
/// or when the one in force is the one this replica knew but Redis went back to older data
/// (its generation is below what this replica saw, or ARGV[5] = '1': the caller found so). A replica that knew another epoch learns that state
/// was lost since: no token issued up to the epoch's cut-off may pass (those tokens'
/// revocations and counters may be gone). The generation never falls below what this replica
/// saw. KEYS: epoch, revoked-before, generation. ARGV: a new id, the epoch this replica knew
/// ('' if none), the cut-off of a new epoch (this replica's clock plus the clock-skew
/// allowance), the highest generation it saw, '1' to start a new epoch. Returns the epoch.
pub(super) const RESYNC: &str = r"
local current = redis.call('GET', KEYS[1])
local gen = tonumber(redis.call('GET', KEYS[3]) or 0)
local rolled_back = ARGV[5] == '1' or gen < tonumber(ARGV[4])
if not current or (rolled_back and current == ARGV[2]) then
  current = ARGV[1] .. ':' .. ARGV[3]
  redis.call('SET', KEYS[1], current)
end
if ARGV[2] ~= '' and ARGV[2] ~= current then
  local cut = tonumber(string.match(current, ':(%d+)$'))
  local before = tonumber(redis.call('GET', KEYS[2]) or 0)
  if cut > before then redis.call('SET', KEYS[2], cut) end
end
if gen < tonumber(ARGV[4]) then redis.call('SET', KEYS[3], ARGV[4]) end
return current
";

/// Seeds what a replica's journal knows: ARGV[1] is JSON `{jtis: [[jti, until]], clients:
/// [[client, at]], switches: [[connector, disabled, generation, epoch]]}`. Nothing newer is
/// overwritten; for kill switches, "newer" is [`SWITCH_ORDER`]'s.
pub(super) const SEED: &str = r"
local j = cjson.decode(ARGV[1])
local now = tonumber(redis.call('TIME')[1])
for _, e in ipairs(j.jtis) do
  -- NX: a revocation Redis still holds is not written again every round. Its second is on
  -- the replica's clock: kept at least an hour past Redis's own (as `keep_until` does), so a
  -- Redis clock far ahead neither skips it nor sets it already expired.
  local keep = math.max(tonumber(e[2]), now + 3600)
  redis.call('SET', 'credbroker:revoked:jti:' .. e[1], 1, 'EXAT', keep, 'NX')
end
for _, e in ipairs(j.clients) do
  local at = tonumber(redis.call('HGET', 'credbroker:revoked:clients', e[1]) or -1)
  if at < e[2] then redis.call('HSET', 'credbroker:revoked:clients', e[1], e[2]) end
end
local current = redis.call('GET', 'credbroker:epoch') or ''
for _, e in ipairs(j.switches) do
  local epoch = e[4] or ''
  local cur = redis.call('HGET', 'credbroker:switches', e[1])
  local write = not cur
  if cur then
    local flag, gen, cur_epoch = string.match(cur, '^(%d):(%d+):?(.*)$')
    write = not flag
      or replaces(e[2], e[3], epoch, flag == '1', tonumber(gen), cur_epoch, current)
  end
  if write then
    redis.call('HSET', 'credbroker:switches', e[1],
      (e[2] and '1' or '0') .. ':' .. string.format('%.0f', e[3]) .. ':' .. epoch)
  end
end
return 1
";

/// Whether kill-switch entry `a` replaces entry `b` (each: disabled, generation, the epoch it
/// was made in) while `current` is the epoch in force. Generations order the changes of one
/// history only: a loss or a rollback starts a new epoch and may wind the counter back, so
/// - a change made in the current epoch replaces any made before it;
/// - between two changes of the current epoch, the higher generation wins;
/// - between two changes made before the last loss, whose order the loss may have scrambled
///   (a rollback hands out lost generations again), a switch-off wins over a switch-on (fail
///   closed: an operator enables again), and otherwise the higher generation.
///
/// The Rust side ([`super::switch_replaces`]) orders the journal the same way.
pub(super) const SWITCH_ORDER: &str = r"
local function replaces(a_off, a_gen, a_epoch, b_off, b_gen, b_epoch, current)
  local a_now, b_now = a_epoch == current, b_epoch == current
  if a_now ~= b_now then return a_now end
  if not a_now and a_off ~= b_off then return a_off end
  return a_gen > b_gen
end
";

/// The admin changes. Each first checks the epoch and the generation (`guard`), then raises
/// the generation. Returns `{verdict, generation, value}`.
///
/// One token. KEYS: its key. ARGV: epoch, generation seen, the second the entry may go.
pub(super) const REVOKE_JTI: &str = r"
local g = guard()
if g then return {g, 0, 0} end
redis.call('SET', KEYS[1], 1, 'EXAT', keep_until(ARGV[3]))
return {'ok', redis.call('INCR', 'credbroker:generation'), 0}
";

/// A client; its cut-off only ever moves forward. KEYS: revoked clients. ARGV: epoch,
/// generation seen, client, cut-off second. The value is the cut-off in force.
pub(super) const REVOKE_CLIENT: &str = r"
local g = guard()
if g then return {g, 0, 0} end
local at = tonumber(redis.call('HGET', KEYS[1], ARGV[3]) or -1)
local cut = tonumber(ARGV[4])
if at < cut then redis.call('HSET', KEYS[1], ARGV[3], cut) else cut = at end
return {'ok', redis.call('INCR', 'credbroker:generation'), cut}
";

/// The kill switch. KEYS: switches. ARGV: epoch, generation seen, connector, '1'/'0'. The
/// entry is `<1|0>:<generation>:<epoch>`: the generation it raises orders it among the
/// changes of this epoch for every replica, whatever their clocks ([`SWITCH_ORDER`]).
pub(super) const SWITCH: &str = r"
local g = guard()
if g then return {g, 0, 0} end
local gen = redis.call('INCR', 'credbroker:generation')
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4] .. ':' .. gen .. ':' .. ARGV[1])
return {'ok', gen, gen}
";
