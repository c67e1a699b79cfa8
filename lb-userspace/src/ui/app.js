// The lb status page: reads /api/v1/services, /api/v1/stats and
// /api/v1/status every few seconds with the token typed into the page (kept
// in sessionStorage, this tab only) and drives drain / activate / weight
// through PATCH /api/v1/services/{name}/backends/{address}.
// Everything from the API is written with textContent, never as HTML.
'use strict';
(function () {
  const REFRESH_MS = 3000;
  const KEY = 'lb-token';
  const SVG = 'http://www.w3.org/2000/svg';
  let token = sessionStorage.getItem(KEY) || '';
  let layout = null;
  let errorKind = null;
  let timer = null;
  const rows = new Map();

  const $ = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function showError(message, kind) {
    const e = $('error');
    e.textContent = message;
    e.hidden = false;
    errorKind = kind;
  }

  function clearError(kind) {
    if (kind === undefined || errorKind === kind) {
      $('error').hidden = true;
      $('error').textContent = '';
      errorKind = null;
    }
  }

  function notice(message) {
    const n = $('notice');
    n.textContent = message;
    n.hidden = !message;
  }

  async function api(method, path, body) {
    const headers = {};
    if (token) headers['Authorization'] = 'Bearer ' + token;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const r = await fetch('/api/v1' + path, {
      method: method,
      headers: headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
      credentials: 'omit',
    });
    const text = await r.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!r.ok) {
      const msg = data && typeof data.error === 'string' ? data.error : (text || r.statusText);
      const err = new Error(r.status + ' ' + msg);
      err.status = r.status;
      err.retryAfter = Number(r.headers.get('Retry-After')) || 0;
      throw err;
    }
    return data;
  }

  function num(v) {
    if (!isFinite(v) || v === 0) return '0';
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toFixed(2) + 'G';
    if (a >= 1e6) return (v / 1e6).toFixed(2) + 'M';
    if (a >= 1e4) return (v / 1e3).toFixed(1) + 'k';
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }

  function bytes(v) {
    if (!isFinite(v) || v === 0) return '0 B/s';
    const units = ['B/s', 'KB/s', 'MB/s', 'GB/s'];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)) + ' ' + units[i];
  }

  // An inline SVG sparkline of `values` (oldest first), `slots` wide.
  function sparkline(values, slots, label) {
    const w = 60, h = 18;
    const svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('class', 'spark');
    svg.setAttribute('width', w);
    svg.setAttribute('height', h);
    svg.setAttribute('viewBox', '0 0 ' + w + ' ' + h);
    const bg = document.createElementNS(SVG, 'rect');
    bg.setAttribute('width', w);
    bg.setAttribute('height', h);
    svg.appendChild(bg);
    const max = Math.max(0, ...values);
    const title = document.createElementNS(SVG, 'title');
    title.textContent = label + ': max ' + num(max) + '/s over the last ' + values.length + ' samples';
    svg.appendChild(title);
    if (values.length > 0) {
      // Newest at the right edge; one step per sample of the window.
      const step = w / Math.max(1, slots - 1);
      const pts = values.map((v, i) => {
        const x = w - (values.length - 1 - i) * step;
        const y = max > 0 ? h - 2 - (v / max) * (h - 4) : h - 2;
        return [x, y];
      });
      if (pts.length === 1) pts.unshift([w - step, pts[0][1]]);
      const fmt = (p) => p[0].toFixed(1) + ',' + p[1].toFixed(1);
      const area = document.createElementNS(SVG, 'polygon');
      area.setAttribute('points', [[pts[0][0], h]].concat(pts, [[w, h]]).map(fmt).join(' '));
      svg.appendChild(area);
      const line = document.createElementNS(SVG, 'polyline');
      line.setAttribute('points', pts.map(fmt).join(' '));
      svg.appendChild(line);
    }
    return svg;
  }

  const COLUMNS = [
    ['Backend', ''], ['State', ''], ['Health', ''], ['Last failure', ''], ['Weight', 'num'],
    ['Maglev slots', 'num'], ['New flows/s (5 min)', 'num'], ['Packets/s (5 min)', 'num'],
    ['Bytes/s (5 min)', 'num'], ['Actions', ''],
  ];

  function rowKey(service, address) { return service + '\u0000' + address; }

  function build(services) {
    const main = $('services');
    main.textContent = '';
    rows.clear();
    if (services.length === 0) {
      main.appendChild(el('p', null, 'No services.'));
    }
    for (const s of services) {
      const table = el('table', 'service');
      table.dataset.service = s.name;
      table.appendChild(el('caption'));
      const head = el('tr');
      for (const [name, cls] of COLUMNS) head.appendChild(el('th', cls, name));
      table.appendChild(el('thead')).appendChild(head);
      const body = table.appendChild(el('tbody'));
      for (const b of s.backends) {
        const tr = el('tr', 'backend');
        tr.dataset.service = s.name;
        tr.dataset.address = b.address;
        const cells = {};
        for (const [c, cls] of [['address', ''], ['state', ''], ['health', ''], ['error', ''],
          ['weight', 'num'], ['slots', 'num'], ['flows', 'num rate'], ['packets', 'num rate'],
          ['bytes', 'num rate']]) {
          cells[c] = tr.appendChild(el('td', ('c-' + c + ' ' + cls).trim()));
        }
        const actions = tr.appendChild(el('td', 'actions'));
        const drain = actions.appendChild(el('button', 'drain', 'Drain'));
        const activate = actions.appendChild(el('button', 'activate', 'Activate'));
        const weight = actions.appendChild(el('input', 'weight'));
        weight.type = 'number';
        weight.min = '0';
        weight.max = '65535';
        weight.title = 'weight 0..65535';
        const setWeight = actions.appendChild(el('button', 'set-weight', 'Set'));
        setWeight.title = 'set the weight';
        drain.type = activate.type = setWeight.type = 'button';
        drain.addEventListener('click', () => change(s.name, b.address, { state: 'draining' }, 'drain', 'draining'));
        activate.addEventListener('click', () => change(s.name, b.address, { state: 'active' }, 'activate', 'active'));
        setWeight.addEventListener('click', () => {
          const w = Number(weight.value);
          if (weight.value === '' || !Number.isInteger(w) || w < 0 || w > 65535) {
            showError('Weight must be a whole number from 0 to 65535.', 'action');
            return;
          }
          change(s.name, b.address, { weight: w }, 'set the weight of', 'weight ' + w);
        });
        cells.drain = drain;
        cells.activate = activate;
        cells.weightInput = weight;
        rows.set(rowKey(s.name, b.address), { tr: tr, cells: cells });
        body.appendChild(tr);
      }
      main.appendChild(table);
    }
  }

  function caption(table, s, stat) {
    const c = table.querySelector('caption');
    c.textContent = '';
    c.appendChild(el('span', 'name', s.name));
    const attr = (k, v) => {
      const a = c.appendChild(el('span', 'attr', k + ' '));
      a.appendChild(el('b', null, v));
    };
    attr('listen', s.listen);
    attr('protocols', (s.protocols || []).join(', '));
    attr('forwarding', s.forwarding);
    attr('health check', s.health ? s.health.kind : 'none');
    attr('when all down', s.when_all_down);
    if (stat && stat.table_size) attr('Maglev table', String(stat.table_size) + ' slots');
    c.appendChild(s.fail_open
      ? el('span', 'badge failopen', 'FAILING OPEN')
      : el('span', 'badge ok', 'serving'));
  }

  // A rate cell: the last interval's value and its five minutes.
  function rate(cell, text, history, samples, label) {
    cell.textContent = '';
    cell.appendChild(el('span', 'v', text));
    cell.appendChild(sparkline(history || [], samples, label));
  }

  function render(services, stats, status) {
    const sig = JSON.stringify(services.map((s) => [s.name, s.backends.map((b) => b.address)]));
    if (sig !== layout) {
      build(services);
      layout = sig;
    }
    const statOf = new Map();
    for (const s of (stats && stats.services) || []) {
      statOf.set(s.name, s);
      for (const b of s.backends) statOf.set(rowKey(s.name, b.address), b);
    }
    const samples = (stats && stats.samples) || 60;
    for (const s of services) {
      const table = document.querySelector('table.service[data-service="' + CSS.escape(s.name) + '"]');
      if (table) caption(table, s, statOf.get(s.name));
      const total = (statOf.get(s.name) || {}).table_size || 0;
      for (const b of s.backends) {
        const row = rows.get(rowKey(s.name, b.address));
        if (!row) continue;
        const st = statOf.get(rowKey(s.name, b.address)) || {};
        const c = row.cells;
        const cls = b.state === 'disabled' ? 'disabled' : !b.healthy ? 'down'
          : b.state === 'draining' ? 'draining' : 'up';
        row.tr.className = 'backend ' + cls;
        c.address.textContent = b.address;
        c.state.textContent = b.state;
        c.health.textContent = '';
        c.health.appendChild(el('b', null, b.healthy ? 'up' : 'down'));
        c.error.textContent = b.last_error || '';
        c.weight.textContent = String(b.weight);
        c.slots.textContent = '';
        const slots = st.slots || 0;
        const share = total > 0 ? slots / total : 0;
        c.slots.appendChild(document.createTextNode(slots + ' (' + (share * 100).toFixed(1) + '%)'));
        const bar = c.slots.appendChild(el('span', 'share'));
        bar.appendChild(el('i')).style.width = (share * 100).toFixed(1) + '%';
        const h = st.history || {};
        rate(c.flows, num(st.new_flows_per_second || 0), h.new_flows, samples, 'new flows/s');
        rate(c.packets, num(st.packets_per_second || 0), h.packets, samples, 'packets/s');
        rate(c.bytes, bytes(st.bytes_per_second || 0), h.bytes, samples, 'bytes/s');
        c.drain.disabled = b.state === 'draining';
        c.activate.disabled = b.state === 'active';
        if (document.activeElement !== c.weightInput) c.weightInput.value = String(b.weight);
      }
    }
    if (status) {
      $('version').textContent = status.version ? 'v' + status.version : '';
      const parts = [];
      if (status.config) parts.push('config ' + status.config);
      if (status.config_fingerprint) parts.push('fingerprint ' + String(status.config_fingerprint).slice(0, 12));
      parts.push(status.api_changes ? 'API changes in force' : 'as configured');
      parts.push('reloads ' + status.reloads);
      $('meta').textContent = parts.join(' · ');
    }
  }

  // Reads the API and schedules the next read. A refused or missing token
  // stops the refreshing until a token is entered: every refusal counts
  // against this address's failed authentications (admin.auth_failures_per_minute).
  async function refresh() {
    clearTimeout(timer);
    let next = REFRESH_MS;
    try {
      const services = await api('GET', '/services');
      const [stats, status] = await Promise.all([
        api('GET', '/stats'), api('GET', '/status').catch(() => null),
      ]);
      render(services, stats, status);
      clearError('refresh');
      $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
    } catch (e) {
      if (e.status === 401) {
        next = null;
        showError((token ? 'The token was refused' : 'The API needs a token') +
          ': enter the read or admin token above; the page stops refreshing until then (' +
          e.message + ').', 'refresh');
      } else if (e.status === 429) {
        next = Math.max(REFRESH_MS, (e.retryAfter || 60) * 1000);
        showError('The API asks to wait ' + Math.round(next / 1000) + ' s (' + e.message + ').', 'refresh');
      } else {
        showError('Cannot read the API: ' + e.message, 'refresh');
      }
    } finally {
      clearTimeout(timer);
      timer = next === null ? null : setTimeout(refresh, next);
    }
  }

  // PATCHes a backend: `what` names the action, `done` the new state.
  async function change(service, address, body, what, done) {
    if (!token) {
      showError('Enter the admin token above to ' + what + ' ' + address + '.', 'action');
      return;
    }
    try {
      await api('PATCH', '/services/' + encodeURIComponent(service) + '/backends/' +
        encodeURIComponent(address), body);
      clearError('action');
      notice(service + ' ' + address + ': ' + done + '.');
    } catch (e) {
      notice('');
      showError('Could not ' + what + ' ' + address + ': ' + e.message, 'action');
    }
    refresh();
  }

  function showToken() {
    $('token-state').textContent = token ? 'token set' : 'no token';
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('auth').addEventListener('submit', (ev) => {
      ev.preventDefault();
      token = $('token').value.trim();
      $('token').value = '';
      if (token) sessionStorage.setItem(KEY, token); else sessionStorage.removeItem(KEY);
      clearError();
      notice('');
      showToken();
      refresh();
    });
    $('token-forget').addEventListener('click', () => {
      token = '';
      sessionStorage.removeItem(KEY);
      showToken();
      refresh();
    });
    showToken();
    refresh();
  });
})();
